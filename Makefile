# Quick start: `make run` chats with the default model; `make test` installs everything and runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROMPT ?=

.PHONY: install run ui test lint bench browser-deps clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A plain torch requirement would pull GBs of CUDA wheels; take the CPU build first when none is there.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/localrun chat $(if $(PROMPT),-p "$(PROMPT)",)

ui: install
	$(VENV)/bin/localrun ui

browser-deps:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium not installed: browser tests will be skipped"; }

lint: install
	$(VENV)/bin/ruff check localrun ui tests bench
	$(VENV)/bin/ruff format --check localrun ui tests bench

test: install browser-deps
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/localrun bench --json > bench/results/llamacpp-cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

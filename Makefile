# Quick start: `make run` chats with the default model; `make test` installs everything and runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROMPT ?=

.PHONY: install run ui test lint bench browser-deps clean

# llama-cpp-python is compiled for the CPU it is built on (-march=native), so its wheel is kept per CPU and per
# flags: pip's own cache keys a built wheel by the source only, and would hand one machine's build to another.
# AMX is left out on x86: virtual machines that report AMX (Firecracker among them) fault on its tile
# instructions (SIGILL on the first prefill of a Q8_0 or Q4 model). CMAKE_ARGS (e.g. -DGGML_CUDA=on) passes through.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_CFLAGS ?= $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16,)
LLAMA_CPP_KEY := $(shell (uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null; sysctl -n machdep.cpu.brand_string 2>/dev/null; echo "$(LLAMA_CPP_VERSION) $(LLAMA_CPP_CFLAGS) $$CMAKE_ARGS") | cksum | cut -d' ' -f1)
LLAMA_CPP_WHEELS ?= $(HOME)/.cache/localrun/wheels/llama-cpp-python-$(LLAMA_CPP_KEY)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A plain torch requirement would pull GBs of CUDA wheels; take the CPU build first when none is there.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) for this CPU (about 5 minutes, once)"; \
	  CFLAGS="$(LLAMA_CPP_CFLAGS)" CXXFLAGS="$(LLAMA_CPP_CFLAGS)" $(PIP) wheel -q --no-cache-dir --no-deps \
	    --no-binary llama-cpp-python -w $(LLAMA_CPP_WHEELS).tmp "llama-cpp-python==$(LLAMA_CPP_VERSION)" && \
	  rm -rf $(LLAMA_CPP_WHEELS) && mv $(LLAMA_CPP_WHEELS).tmp $(LLAMA_CPP_WHEELS); }
	$(PIP) install -q --force-reinstall --no-deps $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
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

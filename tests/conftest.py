"""Shared fixtures: the real default model (SmolLM2-135M-Instruct Q4_1) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from localrun.catalog import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llama_backend(default_gguf):
    """One loaded llama.cpp backend for the session (loading takes a fraction of a second, but
    sharing it also exercises reuse across requests)."""
    from localrun.backends import load_backend
    from localrun.settings import LoadOptions

    backend = load_backend(default_gguf, LoadOptions(n_ctx=2048))
    yield backend
    backend.close()


def run_localrun(
    *args: str, input: str | None = None, timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would, capturing stdout and stderr separately."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "localrun.cli", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )


def cached_build(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:  # type: ignore[no-untyped-def]
    """A session-wide build product shared by test modules by name (same base temp dir, built once)."""
    path = tmp_path_factory.getbasetemp() / name
    if not path.exists():
        build(path)
    return path


@pytest.fixture
def cli():
    return run_localrun

"""Shared helpers for the bench scripts: llama.cpp's tools, subprocess runs, JSON results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def llama_tool(name: str) -> Path:
    """A llama.cpp tool built by bench/llama_tools.sh ($LOCALRUN_LLAMA_TOOLS/bin, else the default prefix)."""
    prefixes = [
        os.environ.get("LOCALRUN_LLAMA_TOOLS"),
        "/work/llama-tools",
        Path.home() / ".cache/localrun/llama-tools",
    ]
    for prefix in filter(None, prefixes):
        path = Path(prefix) / "bin" / name
        if path.exists():
            return path
    sys.exit(f"{name} not found: build it with bench/llama_tools.sh (or set LOCALRUN_LLAMA_TOOLS)")


def localrun(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run our CLI from this checkout, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "localrun.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=True)


def run(cmd: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(name: str, result: dict) -> Path:
    """Write JSON atomically to bench/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def default_model() -> Path:
    sys.path.insert(0, str(REPO))
    from localrun.models.catalog import default_model_path

    return default_model_path()


def physical_cores() -> int:
    sys.path.insert(0, str(REPO))
    from localrun.hardware import physical_cores as cores

    return cores()

"""Shared by the API tests: a real `localrun serve` process on a free loopback port, and its fixtures' parts."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import REPO

KEY = "test-key-5b1c"
N_CTX = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*args: str, env: dict[str, str], port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `localrun serve` process on a loopback port (a free one unless given), once /health answers."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localrun.cli", "serve", "--port", str(port), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"localrun serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("localrun serve did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def keyed_server() -> Iterator[str]:
    """For a module fixture: `localrun serve` with its key from $LOCALRUN_API_KEY; yields its base URL."""
    proc, base = start_server("--n-ctx", str(N_CTX), env={**os.environ, "LOCALRUN_API_KEY": KEY})
    yield base
    stop(proc)


def metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0

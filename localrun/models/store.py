"""The local model store: what is on disk, and removing it safely. Used by the CLI and the UI."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from localrun.errors import UserError
from localrun.models import catalog


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One model on disk, as `models list` shows it."""

    name: str
    format: str
    quant: str
    size_bytes: int
    context_length: int | None
    path: Path


def _gguf_row(name: str, path: Path) -> LocalModel:
    from localrun.models.gguf_info import inspect_gguf

    try:
        info = inspect_gguf(path)
        return LocalModel(name, "gguf", info.quant_type, path.stat().st_size, info.context_length, path)
    except UserError:
        return LocalModel(name, "gguf", "corrupt", path.stat().st_size, None, path)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _hf_row(name: str, snapshot: Path) -> LocalModel:
    try:
        config = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "?")
    return LocalModel(name, "safetensors", dtype, dir_size(snapshot), config.get("max_position_embeddings"), snapshot)


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    kind: str  # "gguf" (a file) or "hf" (a snapshot folder in the HF cache)
    path: Path
    removable: Path | None  # what rm deletes: the store file, the repo's cache folder; None outside the store


def _entries() -> list[_Entry]:
    """What `models list` shows, without opening any file: the default model, store GGUFs, cached repos."""
    entries = [_Entry(catalog.DEFAULT_MODEL_NAME, "gguf", catalog.default_model_path(), None)]
    by_file = {(v.repo, v.filename): m.name for m in catalog.catalog() for v in m.variants}
    store = catalog.models_dir()
    for path in sorted(store.glob("*/*/**/*.gguf")) if store.is_dir() else []:
        parts = path.relative_to(store).parts
        repo, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[2:])
        if path.is_file():
            entries.append(_Entry(by_file.get((repo, filename), f"{repo}:{filename}"), "gguf", path, path))
    cache = catalog.hf_cache_dir()
    for folder in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        repo = folder.name.removeprefix("models--").replace("--", "/", 1)
        snapshot = catalog.hf_snapshot(repo)
        if snapshot is not None:
            entries.append(_Entry(by_file.get((repo, None), repo), "hf", snapshot, folder))
    return entries


def local_models() -> list[LocalModel]:
    """The default model, every GGUF in the store (subfolders included), and safetensors repos in the HF cache.

    A file that fails validation is listed with quant "corrupt", never raised.
    """
    return [_gguf_row(e.name, e.path) if e.kind == "gguf" else _hf_row(e.name, e.path) for e in _entries()]


def display_path(path: Path) -> str:
    """A path as the UI shows it to a browser: relative to the store or the HF cache, never the home folder."""
    for label, root in (("store", catalog.models_dir()), ("hf-cache", catalog.hf_cache_dir())):
        if path.is_relative_to(root):
            return f"{label}/{path.relative_to(root).as_posix()}"
    return path.name


def _same_file(spec: str, path: Path) -> bool:
    given = Path(spec).expanduser()
    try:
        return given.exists() and given.resolve() == path.resolve()
    except OSError:
        return False


def _match(spec: str, *, by_path: bool) -> list[_Entry]:
    """Listed entries named spec, or (by_path) whose path is spec."""
    entries = _entries()
    by_name = [e for e in entries if spec == e.name]
    return by_name or ([e for e in entries if _same_file(spec, e.path)] if by_path else [])


def _inside(path: Path, root: Path) -> bool:
    real, base = path.resolve(), root.resolve()
    return real != base and real.is_relative_to(base)


def removable(spec: str, *, by_path: bool = True) -> list[Path]:
    """What rm would delete for a name (or, by_path, a path) that `models list` shows; never a folder of the
    store or anything else. The UI passes by_path=False: a browser names models, it does not send paths."""
    matches = _match(spec, by_path=by_path)
    if not matches:
        if by_path and Path(spec).expanduser().exists():
            raise UserError(
                f"{spec} is not a model that `localrun models list` shows: rm deletes only those, "
                "never folders of the store, the cache or files outside it."
            )
        raise UserError(f"No downloaded model {spec!r}: see `localrun models list`.{catalog.suggest(spec)}")
    targets = []
    for entry in matches:
        target = entry.removable
        root = catalog.models_dir() if entry.kind == "gguf" else catalog.hf_cache_dir()
        if target is None or not _inside(target, root):
            raise UserError(f"{entry.path} is outside the model store ({catalog.models_dir()}): delete it yourself.")
        if entry.kind == "gguf" and not target.is_file():
            raise UserError(f"{spec} is not a model file: rm deletes only what `localrun models list` shows.")
        targets.append(target)
    return targets


def allowed_spec(spec: str | None, *, loopback: bool) -> None:
    """Raise unless spec may be loaded or inspected from a browser: on loopback anything, else only catalog
    names and models that `models list` shows (a UI on the network must not open arbitrary server paths)."""
    if loopback or not spec or not spec.strip() or spec == catalog.DEFAULT_MODEL_NAME:
        return
    names = {m.name.lower() for m in catalog.catalog()}
    if catalog.split_quant(spec)[0].lower() in names:
        return
    if any(spec in (e.name, str(e.path)) for e in _entries()):
        return
    raise UserError(
        f"{spec!r} is not a catalog model or a model on this machine's list: over the network the UI "
        "opens only those (pick one in the Models tab)."
    )


def delete(targets: list[Path]) -> list[Path]:
    """Delete what removable() returned: a file with its sidecar, partial download and lock, or a cache folder."""
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
            continue
        target.unlink()
        for suffix in (catalog.SIDECAR_SUFFIX, ".part", ".lock"):
            target.with_name(target.name + suffix).unlink(missing_ok=True)
    return targets

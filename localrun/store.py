"""The local model store: what is on disk, and removing it safely. Used by the CLI and the UI."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from localrun import catalog
from localrun.errors import UserError


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
    from localrun.gguf_info import inspect_gguf

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


def local_models() -> list[LocalModel]:
    """The default model, every GGUF in the store, and catalog safetensors repos in the HF cache."""
    rows = [_gguf_row(catalog.DEFAULT_MODEL_NAME, catalog.default_model_path())]
    by_file = {(v.repo, v.filename): m.name for m in catalog.catalog() for v in m.variants}
    store = catalog.models_dir()
    for path in sorted(store.glob("*/*/*.gguf")) if store.is_dir() else []:
        repo = f"{path.parent.parent.name}/{path.parent.name}"
        rows.append(_gguf_row(by_file.get((repo, path.name), f"{repo}:{path.name}"), path))
    cache = catalog.hf_cache_dir()
    for folder in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        repo = folder.name.removeprefix("models--").replace("--", "/", 1)
        snapshot = catalog.hf_snapshot(repo)
        if snapshot is not None:
            rows.append(_hf_row(by_file.get((repo, None), repo), snapshot))
    return rows


def _store_roots() -> list[Path]:
    return [catalog.models_dir().resolve(), catalog.hf_cache_dir().resolve()]


def removable(spec: str) -> list[Path]:
    """The files or cache folders rm would delete for a name, never anything outside the store."""
    matches = [r.path for r in local_models() if spec in (r.name, str(r.path))]
    if not matches and Path(spec).exists():
        matches = [Path(spec)]
    if not matches:
        raise UserError(f"No downloaded model {spec!r}: see `localrun models list`.{catalog.suggest(spec)}")
    targets = []
    for path in matches:
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in _store_roots()):
            raise UserError(f"{path} is outside the model store ({catalog.models_dir()}): delete it yourself.")
        if real.is_relative_to(_store_roots()[1]):
            targets.append(next(p for p in real.parents if p.name.startswith("models--")))
        else:
            targets.append(real)
    return targets


def delete(targets: list[Path]) -> list[Path]:
    """Delete what removable() returned: a file with its sidecar and partial download, or a cache folder."""
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
            continue
        target.unlink()
        for extra in (target.with_name(target.name + catalog.SIDECAR_SUFFIX), target.with_name(target.name + ".part")):
            extra.unlink(missing_ok=True)
    return targets

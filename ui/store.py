"""Model-store helpers for the UI (no Gradio here): catalog rows with fit verdicts, local models, info,
delete, and downloads that report their progress."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun.errors import UserError
from localrun.format import fmt_bytes
from localrun.models import catalog

CATALOG_HEADERS = [
    "name",
    "family",
    "params (B)",
    "quant",
    "size",
    "context",
    "license",
    "on disk",
    "fit on this machine",
]
LOCAL_HEADERS = ["name", "format", "quant", "size", "context", "path"]
SEARCH_HEADERS = ["repo", "kind", "downloads", "likes", "weight files"]


def local_rows() -> list[Any]:
    """Models on disk (the default model first), as cli `models list` finds them."""
    from localrun.models.store import local_models

    return local_models()


def model_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the chat's model picker: every model on disk; value is what Load resolves."""
    choices = []
    for row in local_rows():
        value = row.name if row.name == catalog.DEFAULT_MODEL_NAME or row.format != "gguf" else str(row.path)
        note = " (default)" if row.name == catalog.DEFAULT_MODEL_NAME else ""
        choices.append((f"{row.name}{note} · {row.quant} · {fmt_bytes(row.size_bytes)}", value))
    return choices


def draft_choices() -> list[tuple[str, str]]:
    """The draft picker's choices: none, then every model on disk (the value is what --draft takes)."""
    return [("none", ""), *model_choices()]


def model_kind(spec: str | None) -> str | None:
    """ "gguf", "hf_dir" or "hub_id" for what the picker holds, or None when it does not resolve."""
    try:
        return catalog.resolve_model(spec).kind
    except UserError:
        return None


def allowed_load(spec: str | None, options: Any, *, loopback: bool) -> None:
    """Raise a UserError unless a browser may ask for this load. A remote engine's model is a name there, not a
    path here; but its key file is a file here, and over the network the UI opens no file it does not list."""
    from localrun.models.store import allowed_spec
    from ui.controls import is_remote

    if not is_remote(options):
        allowed_spec(spec, loopback=loopback)
    elif options.remote_api_key_file and not loopback:
        raise UserError(
            "Over the network the UI reads no files on this machine, so a remote engine's API key file works only "
            "in a UI served on loopback (127.0.0.1)."
        )


def recommended(spec: str | None) -> Any | None:
    """The catalog's recommended system prompt and sampling for what the picker holds, or None."""
    try:
        return catalog.resolve_model(spec).recommended
    except UserError:
        return None


def catalog_rows(*, n_ctx: int | None = None, kv_type: str = "f16") -> list[list[Any]]:
    """Every catalog model with its default variant, whether it is on disk, and its fit verdict here; the
    models on disk come first."""
    from localrun.hardware import probe
    from localrun.models.catalog_fit import catalog_verdict
    from localrun.models.fit import fit_report, verdict_line

    devices = probe()
    rows = []
    for model in catalog.catalog():
        variant = model.variant()
        local = catalog.variant_local_path(variant)
        if local is not None and variant.format == "gguf":
            try:
                verdict = verdict_line(fit_report(local, n_ctx=n_ctx, kv_type=kv_type, devices=devices))
            except UserError as exc:
                verdict = str(exc)
        else:
            verdict = catalog_verdict(model, variant, n_ctx=n_ctx, kv_type=kv_type, devices=devices)
        size = variant.size_bytes or (local.stat().st_size if local is not None and local.is_file() else None)
        rows.append(
            [
                model.name,
                model.family,
                round(model.parameter_count / 1e9, 2),
                variant.quant,
                fmt_bytes(size) if size else "?",
                model.context_length,
                model.license,
                "yes" if local is not None else "no",
                verdict,
            ]
        )
    # the models on disk first (what can be loaded now), then the catalog in its order
    return sorted(rows, key=lambda row: row[7] != "yes")


def local_table() -> list[list[Any]]:
    """The models on disk as rows for the Models tab (paths relative to the store: the browser may be remote)."""
    from localrun.models.store import display_path

    return [
        [r.name, r.format, r.quant, fmt_bytes(r.size_bytes), r.context_length or "?", display_path(r.path)]
        for r in local_rows()
    ]


def model_info(spec: str, *, n_ctx: int | None = None, kv_type: str = "f16") -> list[list[str]]:
    """(field, value) rows: GGUF metadata and the memory estimate, a model directory's config, or catalog facts."""
    if not spec:
        raise UserError("Pick a model first: a catalog name, a local model, or a path.")
    try:
        resolved = catalog.resolve_model(spec)
    except UserError:
        model = catalog.find_model(catalog.split_quant(spec)[0])  # in the catalog but not downloaded
        rows = [["name", model.name], ["description", model.description], ["license", model.license]]
        rows += [["parameters", f"{model.parameter_count:,}"], ["context length", str(model.context_length)]]
        rows += [[f"variant {v.quant}", f"{v.format} · {v.repo}/{v.filename or ''}"] for v in model.variants]
        return rows + [["on disk", "no: download it below"]]
    if resolved.kind != "gguf" or resolved.path is None:
        path = resolved.path
        return [["name", resolved.name], ["kind", resolved.kind], ["path", str(path)]]
    return _gguf_info_rows(resolved.path, n_ctx=n_ctx, kv_type=kv_type)


def _gguf_info_rows(path: Path, *, n_ctx: int | None, kv_type: str) -> list[list[str]]:
    from localrun.models.fit import model_rows
    from localrun.models.gguf_info import inspect_gguf

    return [list(row) for row in model_rows(inspect_gguf(path), n_ctx=n_ctx, kv_type=kv_type)]


def delete_model(spec: str) -> list[Path]:
    """Delete a downloaded model (file and sidecars, or its HF-cache folder); never anything outside the store."""
    from localrun.models.store import delete, removable

    return delete(removable(spec, by_path=False))


def search_rows(query: str) -> tuple[list[list[Any]], list[str]]:
    """Hub search results as table rows, and the pull specs (REPO:FILE, or REPO for safetensors) they offer."""
    from localrun.models import hub

    if not query.strip():
        raise UserError("Type something to search for, e.g. 'qwen2.5 gguf'.")
    rows, specs = [], []
    for m in hub.search(query.strip(), limit=10):
        files = ", ".join(f"{f.name} ({fmt_bytes(f.size_bytes)})" for f in m.files[:4])
        more = f" and {len(m.files) - 4} more" if len(m.files) > 4 else ""
        rows.append([m.repo, m.kind, m.downloads, m.likes, files + more])
        ggufs = [f for f in m.files if f.name.endswith(".gguf")]
        specs += [f"{m.repo}:{f.name}" for f in ggufs] if ggufs else [m.repo]
    return rows, specs


@dataclass
class Download:
    """A pull running in a background thread; progress is read from its .part file."""

    spec: str
    part: Path | None = None
    size_bytes: int | None = None
    result: Path | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)

    def fraction(self) -> float | None:
        """How much of the file is here (0..1), or None when the size is unknown."""
        if self.part is None or not self.size_bytes:
            return None
        have = self.part.stat().st_size if self.part.exists() else (self.size_bytes if self.result else 0)
        return min(have / self.size_bytes, 1.0)


def start_download(spec: str) -> Download:
    """Resolve what to fetch (fails fast with a UserError), then pull it in a background thread."""
    from localrun.models import hub

    if not spec.strip():
        raise UserError("Type what to download: a catalog name, REPO, or REPO:FILE from the search.")
    target = hub.resolve_target(spec.strip())
    task = Download(spec.strip())
    if target.filename is not None:
        dest = catalog.store_path(target.repo, target.filename)
        task.part, task.size_bytes = dest.with_name(dest.name + ".part"), target.size_bytes

    def run() -> None:
        try:
            task.result = hub.pull(task.spec)
        except UserError as exc:
            task.error = str(exc)
        except Exception as exc:  # shown in the UI rather than lost in a thread
            task.error = f"{type(exc).__name__}: {exc}"
        finally:
            task.done.set()

    threading.Thread(target=run, name=f"pull {spec}", daemon=True).start()
    return task


def follow(task: Download, *, interval_s: float = 0.5) -> Iterator[str]:
    """Progress lines until the download ends; the last line says where the model is, or what went wrong."""
    while not task.done.wait(interval_s):
        frac = task.fraction()
        took = time.monotonic() - task.started
        if frac is None:
            yield f"Downloading {task.spec}… {took:.0f} s"
        else:
            yield f"Downloading {task.spec}: {frac:.0%} of {fmt_bytes(task.size_bytes)} ({took:.0f} s)"
    if task.error:
        yield f"Download failed: {task.error}"
    else:
        yield f"Downloaded {task.spec}: {task.result}"

"""Backends: llama.cpp for GGUF, transformers + torch for Hugging Face models. Imported lazily.

Model resolution happens here, once: the backends themselves take a ResolvedModel and never read the catalog.
"""

from __future__ import annotations

from pathlib import Path

from localrun.backends.base import Backend, Drafter, LoadReport, ResolvedModel
from localrun.errors import UserError
from localrun.settings import LoadOptions

__all__ = ["Backend", "Drafter", "LoadReport", "ResolvedModel", "backend_for", "load_backend", "pick_backend"]


def backend_for(kind: str, backend: str = "auto") -> str:
    """The backend a load uses for a model kind ("gguf", "hf_dir", "hub_id"): the chosen one, or by the kind."""
    if backend != "auto":
        return backend
    return "llamacpp" if kind == "gguf" else "hf"


def pick_backend(model: ResolvedModel, options: LoadOptions) -> str:
    """llamacpp for a GGUF, hf for a model directory or hub id, unless --backend says otherwise."""
    if options.backend == "llamacpp" and model.kind != "gguf":
        raise UserError(
            f"The llama.cpp backend needs a GGUF file, and {model.name} is a Hugging Face model: use --backend hf, or quantize it to GGUF first."
        )
    return backend_for(model.kind, options.backend)


def load_backend(model: str | Path | ResolvedModel | None, options: LoadOptions | None = None) -> Backend:
    """Resolve a model (path, catalog name, or None for the default) and load it."""
    from localrun.catalog import resolve_model

    options = options or LoadOptions()
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(None if model is None else str(model))
    if pick_backend(resolved, options) == "llamacpp":
        from localrun.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(resolved, options)
    if resolved.kind == "gguf" and resolved.path is not None:
        from localrun.gguf_info import inspect_gguf

        inspect_gguf(resolved.path)  # transformers reads GGUF headers too: refuse corrupt ones first, as llama.cpp does
    from localrun.backends.hf import HFBackend

    return HFBackend(resolved, options)

"""Backends: llama.cpp for GGUF, transformers + torch for Hugging Face models. Imported lazily."""

from __future__ import annotations

from localrun.backends.base import Backend, LoadReport
from localrun.catalog import ResolvedModel, resolve_model
from localrun.errors import UserError
from localrun.settings import LoadOptions

__all__ = ["Backend", "LoadReport", "load_backend", "pick_backend"]


def pick_backend(model: ResolvedModel, options: LoadOptions) -> str:
    """llamacpp for a GGUF, hf for a model directory or hub id, unless --backend says otherwise."""
    if options.backend != "auto":
        if options.backend == "llamacpp" and model.kind != "gguf":
            raise UserError(
                f"The llama.cpp backend needs a GGUF file, and {model.name} is a Hugging Face model: use --backend hf, or quantize it to GGUF first."
            )
        return options.backend
    return "llamacpp" if model.kind == "gguf" else "hf"


def load_backend(model: str | ResolvedModel | None, options: LoadOptions | None = None) -> Backend:
    """Resolve a model (path, catalog name, or None for the default) and load it."""
    options = options or LoadOptions()
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    if pick_backend(resolved, options) == "llamacpp":
        from localrun.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(resolved.path, options)
    from localrun.backends.hf import HFBackend

    return HFBackend(resolved, options)

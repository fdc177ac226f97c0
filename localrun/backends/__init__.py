"""Backends: llama.cpp for GGUF, transformers + torch for Hugging Face models, remote for a model another engine
serves. Imported lazily.

Model resolution happens here, once: the backends themselves take a ResolvedModel and never read the catalog.
"""

from __future__ import annotations

from pathlib import Path

from localrun.backends.base import Backend, LoadReport, ResolvedModel
from localrun.errors import UserError
from localrun.settings import LoadOptions

__all__ = ["Backend", "LoadReport", "ResolvedModel", "backend_for", "load_backend", "pick_backend", "resolve_for"]


def backend_for(kind: str, backend: str = "auto") -> str:
    """The backend a load uses for a model kind ("gguf", "hf_dir", "hub_id", "remote"): the chosen one, or by the kind."""
    if kind == "remote":
        return "remote"
    if backend != "auto":
        return backend
    return "llamacpp" if kind == "gguf" else "hf"


def resolve_for(spec: str | Path | None, options: LoadOptions) -> ResolvedModel:
    """What the user typed, for the load it goes with: with --backend remote or --url it is the name of a model
    the remote engine serves (blank: its first); a saved endpoint's NAME:MODEL or an engine's URL[#MODEL] is that
    engine's model; else a path, catalog name or hub id (catalog.resolve_model)."""
    from localrun.models.catalog import resolve_model
    from localrun.models.endpoints import remote_target

    if options.backend == "remote" or options.url:
        return ResolvedModel(str(spec or ""), None, "remote", url=options.url)
    target = remote_target(None if spec is None else str(spec))
    if target is not None:
        return ResolvedModel(target.model, None, "remote", url=target.url, api_key_file=target.api_key_file)
    return resolve_model(None if spec is None else str(spec))


def pick_backend(model: ResolvedModel, options: LoadOptions) -> str:
    """llamacpp for a GGUF, hf for a model directory or hub id, unless --backend says otherwise."""
    if options.backend == "remote" and model.kind != "remote":
        raise UserError(f"{model.name} is a local model: the remote backend drives an engine elsewhere (pass --url).")
    if options.backend == "llamacpp" and model.kind != "gguf":
        raise UserError(
            f"The llama.cpp backend needs a GGUF file, and {model.name} is a Hugging Face model: use --backend hf, or quantize it to GGUF first."
        )
    return backend_for(model.kind, options.backend)


def load_backend(model: str | Path | ResolvedModel | None, options: LoadOptions | None = None) -> Backend:
    """Resolve a model (path, catalog name, or None for the default) and load it."""
    options = options or LoadOptions()
    resolved = model if isinstance(model, ResolvedModel) else resolve_for(model, options)
    backend = pick_backend(resolved, options)
    if backend == "remote":
        from localrun.backends.remote import RemoteBackend

        return RemoteBackend(resolved, options)
    if backend == "llamacpp":
        from localrun.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(resolved, options)
    if resolved.kind == "gguf" and resolved.path is not None:
        from localrun.models.gguf_info import inspect_gguf

        inspect_gguf(resolved.path)  # transformers reads GGUF headers too: refuse corrupt ones first, as llama.cpp does
    from localrun.backends.hf import HFBackend

    return HFBackend(resolved, options)

"""The fit before download: a GGUFInfo built from a catalog manifest's architecture numbers (the same one
inspect_gguf reads from the file once it is pulled: tests/test_catalog_fit.py checks both on every entry), so
`localrun models fit NAME[:QUANT]` and the Models tab size a model that is not on disk yet."""

from __future__ import annotations

from typing import Any

from localrun.errors import UserError
from localrun.models.fit import _BITS_PER_WEIGHT, fit_report, rough_verdict, verdict_line
from localrun.models.gguf_info import GGUFInfo

# What a GGUF header holds besides the weights, per item (calibrated on the default model's 1.79 MB header):
# a token is its length, its text and its type (plus a score for SentencePiece), a merge is its length and
# text, a tensor its name, shape, type and offset; then the chat template and the other keys.
_HEADER_BYTES_PER_TOKEN = 19
_HEADER_BYTES_PER_SCORE = 4
_HEADER_BYTES_PER_MERGE = 17
_HEADER_BYTES_PER_TENSOR = 80
_HEADER_TENSORS_PER_LAYER = 11
_HEADER_BASE_BYTES = 8 * 1024


def header_bytes_estimate(hparams: Any) -> int:
    """About how many bytes of a GGUF file with these architecture numbers are header, not weights."""
    per_token = _HEADER_BYTES_PER_TOKEN + (_HEADER_BYTES_PER_SCORE if hparams.tokenizer != "gpt2" else 0)
    n_tensors = hparams.n_layers * _HEADER_TENSORS_PER_LAYER + 3
    return (
        _HEADER_BASE_BYTES
        + hparams.vocab_size * per_token
        + hparams.bpe_merges * _HEADER_BYTES_PER_MERGE
        + n_tensors * _HEADER_BYTES_PER_TENSOR
    )


def catalog_weights(model: Any, variant: Any) -> tuple[int, str]:
    """A catalog variant's weight bytes, and where the number comes from: the manifest's tensor bytes, its file
    size less an estimated header, or (no size in the manifest) the parameter count at the quant's bits."""
    if variant.tensor_bytes:
        return variant.tensor_bytes, "the tensor bytes in the manifest"
    if variant.size_bytes and model.hparams is not None:
        header = header_bytes_estimate(model.hparams)
        if variant.size_bytes > header:
            return variant.size_bytes - header, "the file size in the manifest, less an estimated header"
    bits = _BITS_PER_WEIGHT.get(variant.quant.lower(), 16.0)
    why = f"{bits} bits a weight, estimated: no file size in the manifest or the hub's listing"
    return int(model.parameter_count * bits / 8), why


def catalog_info(model: Any, variant: Any = None) -> GGUFInfo | None:
    """What `inspect_gguf` would read from a catalog variant's header once pulled, built from the manifest's
    architecture numbers (`hparams`) and the variant's size; None when the entry has no numbers."""
    from localrun.models.catalog import store_path
    from localrun.models.gguf_info import _swa_layers

    hp = model.hparams
    variant = variant if variant is not None else model.variant()
    if hp is None:
        return None
    if variant.format != "gguf" or not variant.filename:
        raise UserError(f"{model.name}:{variant.quant} is a safetensors repo: the fit estimate needs a GGUF variant.")
    swa = hp.swa_layers
    if swa is None:  # the pattern llama.cpp's loader applies to this architecture, as the header reader does
        swa = _swa_layers(model.architecture, {}, hp.n_layers, hp.sliding_window)
    weights, _ = catalog_weights(model, variant)
    embd_bytes = int(hp.vocab_size * hp.embedding_length * _BITS_PER_WEIGHT.get(variant.quant.lower(), 16.0) / 8)
    return GGUFInfo(
        path=store_path(variant.repo, variant.filename),
        file_bytes=variant.size_bytes or weights,
        version=3,
        architecture=model.architecture,
        name=model.name,
        parameter_count=model.parameter_count,
        tensor_count=hp.n_layers * _HEADER_TENSORS_PER_LAYER + 3,
        tensor_data_bytes=weights,
        context_length=model.context_length,
        n_layers=hp.n_layers,
        n_heads=hp.n_heads,
        n_kv_heads=max(hp.kv_heads_per_layer) if hp.kv_heads_per_layer else (hp.n_kv_heads or hp.n_heads),
        embedding_length=hp.embedding_length,
        head_dim=hp.head_dim or hp.embedding_length // hp.n_heads,
        key_length=hp.head_dim,
        value_length=hp.value_head_dim or hp.head_dim,
        feed_forward_length=hp.feed_forward_length,
        vocab_size=hp.vocab_size,
        expert_count=hp.expert_count,
        sliding_window=hp.sliding_window,
        swa_layers=swa,
        chat_template=None,
        tokenizer_model=hp.tokenizer,
        bos_token_id=None,
        eos_token_id=None,
        add_bos_token=None,
        file_type=variant.quant,
        quant_histogram={},
        kv_heads_per_layer=tuple(hp.kv_heads_per_layer),
        token_embd_bytes=embd_bytes,
        metadata={"tokenizer.ggml.merges": hp.bpe_merges} if hp.tokenizer == "gpt2" else {},
    )


def catalog_verdict(
    model: Any, variant: Any, *, n_ctx: int | None = None, kv_type: str = "f16", devices: list[Any]
) -> str:
    """The verdict line for a catalog variant that is not downloaded: the fit from its manifest's numbers, or
    the rough one from its size where the manifest has none. A bad value gives its sentence as the verdict."""
    try:
        info = catalog_info(model, variant) if variant.format == "gguf" else None
        if info is None:
            return rough_verdict(model.parameter_count, variant.quant, variant.size_bytes, devices)
        return f"{verdict_line(fit_report(info, n_ctx=n_ctx, kv_type=kv_type, devices=devices))} (from the manifest)"
    except UserError as exc:
        return str(exc)

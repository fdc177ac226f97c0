"""bitsandbytes NF4 / INT8: the saved directory reloads, generates like the in-memory model, and is smaller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localrun.errors import UserError
from localrun.quantize.bnb import load_bnb, quantize_bnb


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 256-wide llama saved as safetensors (no tokenizer needed for token-id generation)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("bnb") / "tiny"
    model.save_pretrained(path)
    return path


def _greedy(model, n: int = 8) -> list[int]:  # type: ignore[no-untyped-def]
    import torch

    prompt = torch.tensor([[1, 5, 17, 42, 99, 7]])
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bnb_reloads_and_generates(tiny_dir: Path, tmp_path: Path, mode: str) -> None:
    from transformers import AutoModelForCausalLM

    from localrun.quantize.bnb import bnb_config

    result = quantize_bnb(tiny_dir, tmp_path / f"tiny-{mode}", mode=mode, compute_dtype="float32")
    saved = json.loads((result.path / "config.json").read_text())["quantization_config"]
    if mode == "nf4":
        assert saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"] is True
        assert saved["bnb_4bit_compute_dtype"] == "float32"
    else:
        assert saved["load_in_8bit"] is True
    reloaded = load_bnb(result.path)
    fresh = AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=bnb_config(mode, compute_dtype="float32")
    )
    tokens = _greedy(reloaded)
    assert len(tokens) == 8 and tokens == _greedy(fresh)
    full = AutoModelForCausalLM.from_pretrained(tiny_dir).get_memory_footprint()
    assert result.footprint_bytes == reloaded.get_memory_footprint()
    assert result.footprint_bytes < full * (0.45 if mode == "nf4" else 0.7)
    print(f"{mode}: footprint {result.footprint_bytes / 2**20:.2f} MiB vs F32 {full / 2**20:.2f} MiB")
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{mode}"]


def test_bnb_errors(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nf4, int8"):
        quantize_bnb(tiny_dir, tmp_path / "x", mode="fp3")
    with pytest.raises(UserError, match="no config.json"):
        quantize_bnb(tmp_path / "missing", tmp_path / "x")

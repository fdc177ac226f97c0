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
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
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


# -- the default model through our own loader: saved folders and on-the-fly quantization -------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
N_TOKENS = 12


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct dequantised from the default GGUF to an F32 safetensors folder (shared by name)."""
    from conftest import cached_build

    from localrun.models.catalog import default_model_path
    from localrun.quantize.to_gguf import gguf_to_hf_dir

    return cached_build(tmp_path_factory, "smollm2-hf", lambda p: gguf_to_hf_dir(default_model_path(), p))


@pytest.fixture(scope="module")
def smol_saved(smol_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`localrun quantize smollm2-hf --to NF4 --to INT8`, as the CLI runs it."""
    from localrun.quantize import run_quantize

    out = tmp_path_factory.mktemp("smol-bnb")
    events = list(run_quantize(smol_hf, ["NF4", "INT8"], out_dir=out))
    return {e.target.lower(): e.result.path for e in events if e.stage == "done" and e.result is not None}


def _plain_tokens(path: Path, quant: str | None) -> tuple[list[int], list[int], str]:
    """Plain transformers: from_pretrained with defaults (plus the bitsandbytes config when quantizing on
    the fly, in the dtype our loader uses on the CPU), the tokenizer's chat template, greedy generate()."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localrun.backends.hf_load import quant_config

    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"quantization_config": quant_config(quant, torch.float32), "dtype": torch.float32} if quant else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=N_TOKENS, do_sample=False)
    new = out[0, prompt.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    return prompt[0].tolist(), new, tokenizer.decode(new)


def _our_tokens(path: Path, quant: str) -> tuple[list[int], list[int], object]:
    from localrun.backends import load_backend
    from localrun.settings import LoadOptions, SamplingParams

    backend = load_backend(path, LoadOptions(backend="hf", quant=quant, n_ctx=512))
    try:
        ids = backend.tokenize(backend.render_chat(QUESTION))
        params = SamplingParams(temperature=0.0, max_tokens=N_TOKENS)
        return ids, [step.token_id for step in backend.generate_tokens(ids, params)], backend.report
    finally:
        backend.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "mode"), [("saved", "nf4"), ("saved", "int8"), ("on the fly", "nf4"), ("on the fly", "int8")]
)
def test_default_model_gives_the_tokens_of_plain_transformers(
    smol_hf: Path, smol_saved: dict[str, Path], how: str, mode: str
) -> None:
    path = smol_saved[mode] if how == "saved" else smol_hf
    plain_prompt, expected, text = _plain_tokens(path, None if how == "saved" else mode)
    prompt, tokens, report = _our_tokens(path, "none" if how == "saved" else mode)
    assert prompt == plain_prompt
    assert tokens == expected and "Paris" in text, (tokens, expected, text)
    if how == "saved":  # the dtype it was saved with (NF4: the bf16 compute dtype; INT8: fp16), as transformers does
        assert report.dtype == {"nf4": "bfloat16", "int8": "float16"}[mode]
        assert report.details["weights"] == f"safetensors, saved {mode.upper()}"


@pytest.mark.slow
def test_chat_on_a_saved_int8_folder_answers_cleanly(smol_saved: dict[str, Path]) -> None:
    from conftest import run_localrun

    _, _, text = _plain_tokens(smol_saved["int8"], None)
    done = run_localrun(
        "chat",
        str(smol_saved["int8"]),
        "-p",
        QUESTION[0]["content"],
        "--temperature",
        "0",
        "--max-tokens",
        str(N_TOKENS),
        "--no-stats",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == text + "\n"
    assert "MatMul8bitLt" not in done.stderr and "Traceback" not in done.stderr


def test_a_saved_folder_refuses_another_quant(smol_saved: dict[str, Path]) -> None:
    from localrun.backends import load_backend
    from localrun.settings import LoadOptions

    with pytest.raises(UserError, match="already quantized with bitsandbytes NF4: load it without --quant"):
        load_backend(smol_saved["nf4"], LoadOptions(backend="hf", quant="int8"))


def test_quantize_applies_the_chat_checks(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    from conftest import run_localrun

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    done = run_localrun("quantize", str(pickled), "--to", "NF4", "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--allow-pickle" in lines[0] and "pytorch_model.bin" in lines[0], done.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    remote = tmp_path / "remote"
    shutil.copytree(tiny_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="my-own-llama", auto_map={"AutoModelForCausalLM": "modeling_mine.MyModel"})
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--trust-remote-code"):
        quantize_bnb(remote, tmp_path / "remote-nf4", mode="nf4")
    with pytest.raises(UserError, match="--allow-pickle"):
        quantize_bnb(pickled, tmp_path / "pickled-nf4", mode="nf4")

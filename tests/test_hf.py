"""The transformers backend on the CPU: SmolLM2-135M from the default GGUF, and a tiny random llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from localrun.backends import load_backend  # noqa: E402
from localrun.backends.hf import HFBackend  # noqa: E402
from localrun.engine.generate import generate, stream_generate  # noqa: E402
from localrun.errors import UserError  # noqa: E402
from localrun.settings import LoadOptions, SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "localrun-hf-generate" and t.is_alive()]


def _tokens(backend: HFBackend, ids: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return [step.token_id for step in backend.generate_tokens(ids, params)]


@pytest.fixture(scope="session")
def smol() -> HFBackend:
    """SmolLM2-135M-Instruct from the default Q4_1 GGUF, dequantized to fp32."""
    backend = load_backend(None, LoadOptions(backend="hf"))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tiny_dir(smol: HFBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama with SmolLM2's tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smol.tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,  # wide weights: varied tokens rather than one repeated id
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> HFBackend:
    return load_backend(tiny_dir, LoadOptions(n_ctx=256))


def test_static_cache_gives_the_dynamic_cache_tokens(tiny: HFBackend, tiny_dir: Path) -> None:
    static = load_backend(tiny_dir, LoadOptions(n_ctx=256, static_cache=True))
    assert (tiny.report.kv_cache, static.report.kv_cache) == ("dynamic", "static")
    ids = tiny.tokenize("The quick brown fox jumps over the lazy dog.")
    expected = _tokens(tiny, ids)
    assert len(expected) == GREEDY.max_tokens and len(set(expected)) > 3
    assert _tokens(static, ids) == expected
    # the pre-allocated cache is reset between requests: a second, different request is exact too
    other = tiny.tokenize("Once upon a time")
    assert _tokens(static, other) == _tokens(tiny, other)


def test_sdpa_and_eager_give_the_same_tokens(tiny: HFBackend, tiny_dir: Path) -> None:
    eager = load_backend(tiny_dir, LoadOptions(n_ctx=256, attn="eager"))
    assert (tiny.report.attn, eager.report.attn) == ("sdpa", "eager")
    ids = tiny.tokenize("Attention is all you need, they said.")
    assert _tokens(eager, ids) == _tokens(tiny, ids)


def test_streamed_text_equals_plain_generate(smol: HFBackend) -> None:
    ids = smol.tokenize(smol.render_chat([{"role": "user", "content": "Write a haiku about the sea."}]))
    params = SamplingParams(temperature=0.0, max_tokens=40)
    events = list(stream_generate(smol, ids, params))
    streamed = "".join(e.text for e in events)
    with torch.inference_mode():
        out = smol.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    new = out[0, len(ids) :].tolist()
    assert streamed == smol.tokenizer.decode(new, skip_special_tokens=True)
    assert [t for e in events for t in e.token_ids] == [t for t in new if t not in smol._eos_ids]
    summary = events[-1].summary
    assert summary.prefill_tokens == len(ids) and summary.finish_reason in ("stop", "length")


def test_chat_template_and_single_bos(smol: HFBackend, tiny_dir: Path) -> None:
    prompt = smol.render_chat(QUESTION)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    ids = smol.tokenize(prompt)
    assert ids[0] == smol.tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3
    literal = smol.tokenize("<|im_start|>", special=False)
    assert len(literal) > 1  # special=False reads the marker as plain text
    # a tokenizer that adds BOS by itself must not double the one a template already wrote
    from transformers import AutoTokenizer

    backend = object.__new__(HFBackend)  # tokenize() needs only the tokenizer
    backend.tokenizer = AutoTokenizer.from_pretrained(tiny_dir, add_bos_token=True)
    bos = backend.tokenizer.bos_token_id
    assert backend.tokenizer(backend.tokenizer.bos_token + "Hi")["input_ids"][:2] == [bos, bos]
    assert backend.tokenize("Hi")[0] == bos
    with_bos = backend.tokenize(backend.tokenizer.bos_token + "Hi")
    assert with_bos[0] == bos and with_bos[1] != bos


def test_nf4_from_gguf_is_small_and_answers(smol: HFBackend) -> None:
    nf4 = load_backend(None, LoadOptions(backend="hf", quant="nf4"))
    try:
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in nf4.model.modules())
        ratio = nf4.report.weights_bytes / smol.report.weights_bytes
        assert ratio < 0.45, f"NF4 footprint is {ratio:.2f} of fp32"
        assert nf4.report.details["quant"] == "nf4"
        ids = nf4.tokenize(nf4.render_chat(QUESTION))
        assert "Paris" in generate(nf4, ids, SamplingParams(temperature=0.0, max_tokens=12)).text
    finally:
        nf4.close()


def test_pickle_weights_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_dir / name).exists():
            shutil.copy(tiny_dir / name, tmp_path / name)
    torch.save(load_file(tiny_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="--allow-pickle"):
        load_backend(tmp_path, LoadOptions())
    allowed = load_backend(tmp_path, LoadOptions(allow_pickle=True, n_ctx=64))
    assert allowed.report.details["weights"] == "pickle"


def test_remote_code_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(model_type="my-own-llm", auto_map={"AutoModelForCausalLM": "modeling_mine.MyModel"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_mine.py").write_text("raise SystemExit('remote code ran')\n")
    shutil.copy(tiny_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_backend(tmp_path, LoadOptions())


def test_cancel_stops_generate_and_frees_the_model(smol: HFBackend) -> None:
    ids = smol.tokenize("Count from one to one thousand:")
    long = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    steps = smol.generate_tokens(ids, long)
    first = [next(steps).token_id for _ in range(3)]
    assert _generate_threads()
    steps.close()  # thousands of tokens were asked for: only a stopped generate() lets join() return
    assert not _generate_threads()
    cancel = threading.Event()
    events = []
    for event in stream_generate(smol, ids, long, cancel=cancel):
        events.append(event)
        if len(events) == 2:
            cancel.set()
    assert events[-1].finish_reason == "cancelled" and not _generate_threads()
    assert _tokens(smol, ids, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)) == first


def test_generate_failure_reaches_the_caller(tiny: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(**kwargs):
        raise RuntimeError("out of cheese")

    ids = tiny.tokenize("Hello there")
    with monkeypatch.context() as m:
        m.setattr(tiny.model, "generate", boom)
        with pytest.raises(RuntimeError, match="out of cheese"):
            _tokens(tiny, ids)
        final = list(stream_generate(tiny, ids, GREEDY))[-1]
        assert final.finish_reason == "error" and "out of cheese" in final.summary.error
    assert len(_tokens(tiny, ids)) == GREEDY.max_tokens  # the next request works


def test_full_context_finishes_with_length(tiny_dir: Path) -> None:
    small = load_backend(tiny_dir, LoadOptions(n_ctx=24))
    ids = small.tokenize("one two three four five six seven eight nine ten")
    summary = generate(small, ids, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    assert summary.finish_reason == "length" and summary.generated_tokens == 24 - len(ids)


def test_sampling_is_seeded(tiny: HFBackend) -> None:
    ids = tiny.tokenize("Pick a word:")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16, seed=7, ignore_eos=True)
    runs = [_tokens(tiny, ids, params) for _ in range(2)]
    other = _tokens(tiny, ids, params.replace(seed=8))
    assert runs[0] == runs[1] and runs[0] != other


def test_missing_device_is_a_user_error() -> None:
    from localrun.backends.hf_load import pick_attn, pick_device

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            pick_device("cuda")
    with pytest.raises(UserError, match="flash_attention_2"):
        pick_attn("flash_attention_2", "cpu", torch.float32)
    assert pick_device("cpu") == "cpu"


def test_chat_cli_answers_paris() -> None:
    cmd = [sys.executable, "-m", "localrun.cli", "chat", "--backend", "hf", "-p", "What is the capital of France?"]
    done = subprocess.run(cmd + ["--temperature", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
    assert "hf/cpu" in done.stderr  # the stats line names the backend

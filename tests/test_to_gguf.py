"""HF -> GGUF converter: logits and tokenization match transformers; SmolLM2 survives a round trip."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cached_build

from localrun.errors import UserError
from localrun.models.catalog import default_model_path
from localrun.quantize.to_gguf import convert_hf_to_gguf, gguf_to_hf_dir, restore_pre_tokenizer

TEXT = (
    "Hello world! 1234567890 and 3.14159, costs $1,000,000 (approx.) on 2024-05-17.\n\n\n"
    "   spaced    out\t\ttabs   \n"
    "def f(x):\n    return {'a': [x**2 for x in range(10)]}  # code; a->b != c\n"
    "Café naïve résumé Ångström — “quotes” 日本語のテキスト 中文字符 한국어 "
    "emoji 🤖👍🏽 🇫🇷 it's we'll I'M DON'T <|im_start|> done."
)
EXTRA_TEXTS = ["", " ", "\n", "  leading", "trailing   ", "1", "12", "123", "1234", "a.b.c", "ÀÉÎÕÜ", "🙂" * 3]


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer: vocab and merges from the default GGUF, its Digits+ByteLevel pre-tokenizer."""

    def build(path: Path) -> None:
        from transformers import AutoTokenizer

        gguf = default_model_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
        restore_pre_tokenizer(path, "smollm")

    return cached_build(tmp_path_factory, "smol-tokenizer", build)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_build(tmp_path_factory, "smollm2-hf", lambda p: gguf_to_hf_dir(default_model_path(), p))


@pytest.fixture(scope="session")
def smollm2_f16(tmp_path_factory: pytest.TempPathFactory, smollm2_hf: Path) -> Path:
    return cached_build(
        tmp_path_factory, "smollm2-F16.gguf", lambda p: convert_hf_to_gguf(smollm2_hf, p, out_type="F16")
    )


def _tokenizer_variant(src: Path, dest: Path, pre: str) -> None:
    shutil.copytree(src, dest)
    restore_pre_tokenizer(dest, pre)
    if pre == "qwen2":
        tok = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
        tok["normalizer"] = {"type": "NFC"}
        (dest / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def build_tiny_model(kind: str, tokenizer_dir: Path, out: Path, *, hidden: int = 64, tied: bool = False) -> Path:
    """A random tiny llama/qwen2/mistral (2 layers, 4 heads, 2 KV heads) with weights large enough to matter."""
    import torch
    import transformers

    classes = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
    config_cls = getattr(transformers, f"{classes[kind]}Config")
    model_cls = getattr(transformers, f"{classes[kind]}ForCausalLM")
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": 1e6 if kind.startswith("qwen") else 10000.0}
    extra = {"head_dim": 32} if kind == "qwen3" else {}  # qwen3: head_dim differs from hidden / heads
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
        rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = config_cls(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_parameters=rope,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


VARIANTS = {  # kind -> (pre-tokenizer style, tied embeddings)
    "llama": ("smollm", False),
    "qwen2": ("qwen2", True),
    "qwen3": ("qwen2", True),
    "mistral": ("llama-bpe", False),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    """Builds (once per kind) a tiny model, its F32 GGUF and the conversion result."""
    built: dict[str, tuple] = {}

    def get(kind: str) -> tuple:
        if kind not in built:
            pre, tied = VARIANTS[kind]
            base = tmp_path_factory.mktemp(f"tiny-{kind}")
            _tokenizer_variant(smol_tokenizer_dir, base / "tok", pre)
            hf_dir = build_tiny_model(kind, base / "tok", base / "hf", tied=tied)
            result = convert_hf_to_gguf(hf_dir, base / "model-F32.gguf", out_type="F32")
            built[kind] = (kind, pre, tied, hf_dir, result.path, result)
        return built[kind]

    return get


@pytest.fixture(params=list(VARIANTS))
def tiny(request: pytest.FixtureRequest, variants):  # type: ignore[no-untyped-def]
    return variants(request.param)


def _hf_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    # F32 KV cache: the default F16 cache alone would add ~1e-3 of error
    llm = Llama(str(gguf), n_ctx=256, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)])
    llm.close()
    return scores


def test_logits_match_transformers(tiny) -> None:
    from transformers import AutoTokenizer

    kind, pre, _, hf_dir, gguf, result = tiny
    assert result.pre_tokenizer == pre
    ids = AutoTokenizer.from_pretrained(hf_dir).encode(TEXT, add_special_tokens=False)[:96]
    expected, got = _hf_logits(hf_dir, ids), _llama_logits(gguf, ids)
    max_diff = float(np.abs(expected - got).max())
    print(f"{kind}: max |logit diff| = {max_diff:.2e} over {len(ids)} positions, logit std {expected.std():.2f}")
    assert max_diff < 1e-3
    assert (expected.argmax(-1) == got.argmax(-1)).all()


def _llama_vocab(gguf: Path):  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    return Llama(str(gguf), vocab_only=True, verbose=False)


def test_tokenization_matches_transformers(tiny) -> None:
    from transformers import AutoTokenizer

    _, _, _, hf_dir, gguf, _ = tiny
    hf = AutoTokenizer.from_pretrained(hf_dir)
    llm = _llama_vocab(gguf)
    # HF always parses added tokens such as <|im_start|> in text; llama.cpp does when special=True
    for text in [TEXT, *EXTRA_TEXTS]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False)
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == hf.encode(TEXT)  # same BOS default
    assert llm.detokenize(hf.encode(TEXT, add_special_tokens=False), special=True).decode() == TEXT


def test_metadata(tiny) -> None:
    from gguf import GGUFReader

    kind, pre, tied, _, gguf, _ = tiny
    reader = GGUFReader(gguf)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or "id" in k}
    names = {t.name for t in reader.tensors}
    arch = kind if kind.startswith("qwen") else "llama"
    assert fields["general.architecture"] == arch
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre
    assert fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert ("output.weight" in names) == (not tied)
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")
    assert ("rope_freqs.weight" in names) == (kind == "llama")
    assert ("blk.0.attn_q_norm.weight" in names) == (kind == "qwen3")
    if kind == "qwen3":
        assert fields["qwen3.attention.key_length"] == 32
        assert [t.shape.tolist() for t in reader.tensors if t.name == "blk.0.attn_q.weight"] == [[64, 128]]
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)


def test_smollm2_tokenizer_restored_like_llama_cpp(smol_tokenizer_dir: Path) -> None:
    """The restored HF tokenizer splits text exactly as llama.cpp does with the original GGUF."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    llm = _llama_vocab(default_model_path())
    for text in [TEXT, *EXTRA_TEXTS]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False)


def test_smollm2_round_trip_chats(smollm2_hf: Path, smollm2_f16: Path) -> None:
    from gguf import GGUFReader
    from llama_cpp import Llama

    reader = GGUFReader(smollm2_f16)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied to token_embd
    llm = Llama(str(smollm2_f16), n_ctx=512, n_threads=2, verbose=False)
    reply = llm.create_chat_completion(
        [{"role": "user", "content": "What is the capital of France?"}], temperature=0.0, max_tokens=24
    )
    assert "Paris" in reply["choices"][0]["message"]["content"]
    original = _llama_vocab(default_model_path())
    assert llm.tokenize(TEXT.encode(), special=True) == original.tokenize(TEXT.encode(), special=True)


@pytest.mark.parametrize("out_type", ["F16", "BF16"])
def test_half_precision_outputs(variants, tmp_path: Path, out_type: str) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    _, _, _, hf_dir, _, _ = variants("llama")
    gguf = convert_hf_to_gguf(hf_dir, tmp_path / f"m-{out_type}.gguf", out_type=out_type).path
    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    assert types["blk.0.attn_q.weight"] == out_type and types["blk.0.attn_norm.weight"] == "F32"
    ids = AutoTokenizer.from_pretrained(hf_dir).encode(TEXT, add_special_tokens=False)[:48]
    expected, got = _hf_logits(hf_dir, ids), _llama_logits(gguf, ids)
    # half precision: small relative error, same ranking almost everywhere
    assert np.abs(expected - got).max() < 0.05 * np.abs(expected).max()
    assert (expected.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_source_untouched_and_output_atomic(variants, tmp_path: Path) -> None:
    _, _, _, hf_dir, _, _ = variants("qwen2")
    before = _digest(hf_dir)
    convert_hf_to_gguf(hf_dir, tmp_path / "out.gguf", out_type="F16")
    assert _digest(hf_dir) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="LlamaForCausalLM.*Qwen3ForCausalLM.*Gemma3ForCausalLM"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_unknown_pre_tokenizer_refused_then_overridden(variants, tmp_path: Path) -> None:
    from gguf import GGUFReader

    _, _, _, hf_dir, _, _ = variants("mistral")
    odd = tmp_path / "odd"
    shutil.copytree(hf_dir, odd)
    tok = json.loads((odd / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,2}|[^\s\p{L}\p{N}]+|\s+"
    (odd / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match="--pre-tokenizer"):
        convert_hf_to_gguf(odd, tmp_path / "odd.gguf", out_type="F16")
    assert not (tmp_path / "odd.gguf").exists() and not list(tmp_path.glob(".odd.gguf.*"))
    convert_hf_to_gguf(odd, tmp_path / "odd.gguf", out_type="F16", pre_tokenizer="llama-bpe")
    assert GGUFReader(tmp_path / "odd.gguf").fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


def test_missing_source_and_bad_type(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no config.json"):
        convert_hf_to_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    with pytest.raises(UserError, match="F32, F16, BF16"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", out_type="F8")


# Gemma 3: a SentencePiece tokenizer.model written here (protobuf by hand: sentencepiece is not a dependency).
GEMMA_WORDS = ["hello", "\u2581world", "\u2581the", "\u2581cat", "\u2581sat"]


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _piece(text: str, score: float, kind: int) -> bytes:
    import struct

    raw = text.encode()
    body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def gemma_pieces() -> list[tuple[str, float, int]]:
    """Gemma's layout: <pad> <eos> <bos> <unk>, turn markers, byte fallback, then words and their prefixes."""
    pieces = [("<pad>", 0.0, 3), ("<eos>", 0.0, 3), ("<bos>", 0.0, 3), ("<unk>", 0.0, 2)]
    pieces += [("<start_of_turn>", 0.0, 4), ("<end_of_turn>", 0.0, 4)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    seen = {p[0] for p in pieces}
    for word in GEMMA_WORDS:
        for end in range(1, len(word) + 1):
            if word[:end] not in seen:
                seen.add(word[:end])
                pieces.append((word[:end], -10.0 + end, 1))  # longer pieces score higher, so they merge
    return pieces


def build_tiny_gemma3(out: Path) -> Path:
    """A random 6-layer Gemma 3 (5 sliding layers, window 8, then one global) with its tokenizer."""
    import torch
    import transformers

    pieces = gemma_pieces()
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    rope["full_attention"] = {"rope_type": "default", "rope_theta": 1e6}
    config = transformers.Gemma3TextConfig(
        vocab_size=len(pieces) + 2,  # padded past the tokenizer, as Gemma's embedding is
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)  # Gemma's norms store weight - 1, so around 0
    model.save_pretrained(out)
    (out / "tokenizer.model").write_bytes(b"".join(_piece(*p) for p in pieces))
    decoder = {str(i): {"content": p[0], "special": True} for i, p in enumerate(pieces[:6])}
    tok_config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tok_config |= {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder}
    tok_config["chat_template"] = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}{% endfor %}"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tiny-gemma3")
    hf_dir = build_tiny_gemma3(base / "hf")
    return hf_dir, convert_hf_to_gguf(hf_dir, base / "model-F32.gguf", out_type="F32").path


def test_gemma3_logits_match_transformers(gemma3) -> None:
    hf_dir, gguf = gemma3
    # 40 positions: past the sliding window of 8, so local and global layers both matter
    ids = [2, *np.random.default_rng(0).integers(4, len(gemma_pieces()), size=39).tolist()]
    expected, got = _hf_logits(hf_dir, ids), _llama_logits(gguf, ids)
    max_diff = float(np.abs(expected - got).max())
    print(f"gemma3: max |logit diff| = {max_diff:.2e} over {len(ids)} positions, logit std {expected.std():.2f}")
    # ~1e-3 at every position, the first included: ggml's CPU GELU reads an F16 table (a wrong norm shift or
    # sliding window would be off by whole logits)
    assert max_diff < 5e-3
    assert (expected.argmax(-1) == got.argmax(-1)).all()


def test_gemma3_metadata_and_tokenizer(gemma3) -> None:
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    hf_dir, gguf = gemma3
    reader = GGUFReader(gguf)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == 8
    assert (fields["gemma3.rope.freq_base"], fields["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)
    assert fields["gemma3.attention.key_length"] == 32
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    n_vocab = len(gemma_pieces()) + 2
    assert (
        len(fields["tokenizer.ggml.tokens"]) == n_vocab and fields["tokenizer.ggml.tokens"][-1] == f"[PAD{n_vocab - 1}]"
    )
    assert fields["tokenizer.ggml.token_type"][:7] == [3, 3, 3, 3, 3, 3, 6]  # turn markers made control tokens
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (2, 1)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied
    weights = load_file(hf_dir / "model.safetensors")
    # Gemma's RMSNorm multiplies by (1 + weight): llama.cpp's expects the 1 already added
    norm = np.asarray(tensors["blk.0.attn_q_norm.weight"].data)
    assert np.array_equal(norm, weights["model.layers.0.self_attn.q_norm.weight"] + 1)
    llm = _llama_vocab(gguf)
    pieces = {p[0]: i for i, p in enumerate(gemma_pieces())}
    assert llm.tokenize(b"hello world", add_bos=True) == [2, pieces["hello"], pieces["\u2581world"]]
    assert llm.tokenize(b"<end_of_turn>", add_bos=False, special=True) == [5]
    assert llm.detokenize([pieces["hello"], pieces["\u2581the"], pieces["\u2581cat"]]) == b"hello the cat"


def test_gemma3_conditional_generation_text_part(gemma3, tmp_path: Path) -> None:
    """A Gemma3ForConditionalGeneration checkpoint converts to the same language model, vision tower left out."""
    from gguf import GGUFReader
    from safetensors.numpy import load_file, save_file

    hf_dir, text_gguf = gemma3
    mm = tmp_path / "gemma3-mm"
    shutil.copytree(hf_dir, mm)
    text = json.loads((hf_dir / "config.json").read_text())
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text}
    config |= {"vision_config": {"hidden_size": 8}, "tie_word_embeddings": True}
    (mm / "config.json").write_text(json.dumps(config))
    weights = {
        k.replace("model.", "model.language_model.", 1): v for k, v in load_file(mm / "model.safetensors").items()
    }
    weights["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 3), np.float32)
    weights["model.multi_modal_projector.mm_input_projection_weight"] = np.zeros((8, 64), np.float32)
    save_file(weights, mm / "model.safetensors")
    gguf = convert_hf_to_gguf(mm, tmp_path / "mm.gguf", out_type="F32").path
    ours, text_only = GGUFReader(gguf), GGUFReader(text_gguf)
    assert [(t.name, t.data.tobytes()) for t in ours.tensors] == [(t.name, t.data.tobytes()) for t in text_only.tensors]
    skip = {"general.name"}  # from the directory name
    assert {k: f.contents() for k, f in ours.fields.items() if k not in skip} == {
        k: f.contents() for k, f in text_only.fields.items() if k not in skip
    }


def test_gemma3_without_sentencepiece_model_refused(gemma3, tmp_path: Path) -> None:
    hf_dir, _ = gemma3
    odd = tmp_path / "no-spm"
    shutil.copytree(hf_dir, odd)
    (odd / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="no tokenizer.model"):
        convert_hf_to_gguf(odd, tmp_path / "x.gguf", out_type="F32")
    (odd / "tokenizer.model").write_bytes(b"\xff\xff not protobuf")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        convert_hf_to_gguf(odd, tmp_path / "x.gguf", out_type="F32")
    assert not list(tmp_path.glob("*.gguf"))

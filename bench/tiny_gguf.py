"""Tiny random GGUFs of the catalog's architectures, with vocabularies of realistic size, for bench/fit.py.

Each file has its architecture's real tensor names and metadata keys (as llama.cpp's loader reads them), a
small width and depth, random F16 weights, and a tokenizer of the real model's size: what makes memory grow
on these models is the vocabulary and the sliding-window cache rules, not the width.

Run: python bench/tiny_gguf.py OUT_DIR [--arch gemma3 ...]   (writes OUT_DIR/tiny-ARCH.gguf)
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Spec:
    """One architecture: sizes, the tokenizer kind, and the extra metadata its llama.cpp loader reads."""

    arch: str
    n_vocab: int
    tokenizer: str  # "gpt2" (byte-level BPE, with merges) or "llama" (SentencePiece, with scores)
    n_merges: int = 0
    pre: str = "default"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 384
    tied: bool = True
    extra: dict = field(default_factory=dict)
    specials: tuple[str, ...] = ()  # control tokens the loader looks up by name


# Vocabulary and merge counts of the catalog's models (Llama-3.2, Qwen2.5, Gemma-2, Phi-3.5) and Gemma 3.
SPECS = {
    "llama": Spec("llama", 128256, "gpt2", n_merges=280147, pre="llama-bpe"),
    "qwen2": Spec("qwen2", 151936, "gpt2", n_merges=151387, pre="qwen2"),
    "gemma2": Spec(
        "gemma2",
        256000,
        "llama",
        head_dim=64,
        extra={"attention.sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    ),
    "phi3": Spec(
        "phi3",
        32064,
        "llama",
        n_head_kv=4,
        tied=False,
        extra={"attention.sliding_window": 262144},
        specials=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
    ),
    "gemma3": Spec(
        "gemma3", 262144, "llama", n_layer=6, n_head_kv=1, head_dim=64, extra={"attention.sliding_window": 512}
    ),
}


# Real sizes, for benches that time decoding (bench/decode.py --model): a tiny width times nothing useful.
# Gemma 3 270M's shape (its config.json): 18 layers, 640 wide, 4 heads of 256, 1 KV head, a 512-token window.
FULL_SIZE = {
    "gemma3-270m": Spec(
        "gemma3",
        262144,
        "llama",
        n_layer=18,
        n_embd=640,
        n_head=4,
        n_head_kv=1,
        head_dim=256,
        n_ff=2048,
        extra={"attention.sliding_window": 512},
    ),
}


def _gpt2_bytes() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens every byte-level BPE vocabulary starts with."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _vocab(spec: Spec, rng: random.Random) -> tuple[list[str], list[int], list[float], list[str]]:
    """Tokens (unique, 2 to 10 letters, like real subwords), their types, SPM scores, and BPE merges."""
    if spec.tokenizer == "gpt2":
        head = _gpt2_bytes()
        types = [1] * len(head)
        space = "Ġ"
    else:
        head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        types = [2, 3, 3] + [6] * 256  # unknown, control, control, byte
        space = "▁"
    seen = set(head)
    tokens = list(head)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(tokens) < spec.n_vocab - len(spec.specials):
        word = (space if rng.random() < 0.5 else "") + "".join(rng.choices(letters, k=rng.randint(2, 9)))
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    types += [1] * (len(tokens) - len(types))
    tokens += spec.specials
    types += [3] * len(spec.specials)
    scores = [-float(i) for i in range(len(tokens))]
    merges: list[str] = []
    for split in (1, 2, 3):  # split each multi-letter token at a few places until there are enough merges
        for tok in tokens[len(head) :]:
            if len(merges) >= spec.n_merges:
                break
            if len(tok) > split:
                merges.append(f"{tok[:split]} {tok[split:]}")
    return tokens, types, scores, merges


def _weights(spec: Spec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The tensors llama.cpp's loader asks for, numpy shape (rows, columns) = ggml's (ne1, ne0)."""
    e, ff, q, kv = spec.n_embd, spec.n_ff, spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    out = {"token_embd.weight": mat(spec.n_vocab, e), "output_norm.weight": norm(e)}
    if not spec.tied:
        out["output.weight"] = mat(spec.n_vocab, e)
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        out[p + "attn_norm.weight"] = norm(e)
        if spec.arch == "phi3":  # fused QKV and fused gate+up
            out[p + "attn_qkv.weight"] = mat(q + 2 * kv, e)
            out[p + "ffn_up.weight"] = mat(2 * ff, e)
        else:
            out[p + "attn_q.weight"] = mat(q, e)
            out[p + "attn_k.weight"] = mat(kv, e)
            out[p + "attn_v.weight"] = mat(kv, e)
            out[p + "ffn_gate.weight"] = mat(ff, e)
            out[p + "ffn_up.weight"] = mat(ff, e)
        if spec.arch == "qwen2":
            for name, n in (("q", q), ("k", kv), ("v", kv)):
                out[p + f"attn_{name}.bias"] = np.zeros(n, dtype=np.float32)
        if spec.arch == "gemma3":
            out[p + "attn_q_norm.weight"] = norm(spec.head_dim)
            out[p + "attn_k_norm.weight"] = norm(spec.head_dim)
        out[p + "attn_output.weight"] = mat(e, q)
        out[p + "ffn_norm.weight"] = norm(e)
        out[p + "ffn_down.weight"] = mat(e, ff)
        if spec.arch in ("gemma2", "gemma3"):
            out[p + "post_attention_norm.weight"] = norm(e)
            out[p + "post_ffw_norm.weight"] = norm(e)
    return out


def write_tiny_gguf(arch: str, path: Path, *, seed: int = 0) -> Path:
    """Write OUT/tiny-ARCH.gguf: random weights, real names and keys, a vocabulary of the real size."""
    import gguf

    spec = SPECS.get(arch) or FULL_SIZE[arch]
    arch = spec.arch
    tokens, types, scores, merges = _vocab(spec, random.Random(seed))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(131072)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    for key, value in spec.extra.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tokenizer_model(spec.tokenizer)
    writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spec.tokenizer == "gpt2":
        writer.add_token_merges(merges)
    else:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, data in _weights(spec, np.random.default_rng(seed)).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--arch", action="append", choices=sorted(SPECS) + sorted(FULL_SIZE), help="default: all the tiny ones"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch or list(SPECS):
        path = write_tiny_gguf(arch, args.out / f"tiny-{arch}.gguf")
        print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Parity of our HF -> GGUF converter with llama.cpp's own convert_hf_to_gguf.py (not part of CI).

Builds tiny random Llama, Qwen3 and Gemma 3 checkpoints with transformers, each with a real-format tokenizer
(SmolLM2's byte-level BPE vocabulary; a SentencePiece model trained here for Gemma), converts each with ours and
with the converter of the llama.cpp that the installed llama-cpp-python vendors, and compares every metadata
key/value and every tensor's name, type, shape and bytes.

Run: python bench/converter_parity.py [--out-type F32|F16|BF16 ...]   (writes bench/results/converter-parity.json)
The llama.cpp sdist is cached where bench/llama_tools.sh keeps it; sentencepiece (which llama.cpp's converter
needs for Gemma) is installed into ~/.cache/localrun/converter-deps, not into the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import REPO, RESULTS  # noqa: E402

CACHE = Path(os.environ.get("LOCALRUN_LLAMA_TOOLS", Path.home() / ".cache/localrun/llama-tools")) / "src"
DEPS = Path.home() / ".cache/localrun/converter-deps"
# Keys allowed to differ, with the reason (none so far: every run below is byte-identical).
EXPECTED_DIFFS: dict[str, str] = {}

# Runs llama.cpp's converter; a synthetic vocabulary's pre-tokenizer hash is unknown to its table, so when the
# hash lookup fails the name given in PARITY_PRE is used (and reported as forced).
RUNNER = r"""
import os, runpy, sys
vendor = os.environ["PARITY_VENDOR"]
sys.path[:0] = [os.path.join(vendor, "gguf-py"), vendor]
from conversion import base
lookup = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return lookup(self, tokenizer)
    except NotImplementedError:
        print("PARITY: pre-tokenizer forced to", os.environ["PARITY_PRE"], file=sys.stderr)
        return os.environ["PARITY_PRE"]
base.TextModel.get_vocab_base_pre = pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path(os.path.join(vendor, "convert_hf_to_gguf.py"), run_name="__main__")
"""

TEXT = "Hello world! 1234567890 costs $1,000 on 2024-05-17.\n  def f(x): return x**2  # Café naïve 日本語 🤖 it's"
SPM_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of lightweight open models built from research and technology.",
    "Hello world! How are you doing today? I am fine, thank you very much.",
    "def main():\n    print('hello')\n    return 0",
    "Numbers like 12345 and 3.14159 and dates like 2024-05-17 appear in text.",
    "Café, naïve, résumé and Ångström are words with accents.",
] * 20


def llama_cpp_vendor() -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's sdist (downloaded once, like bench/llama_tools.sh)."""
    import llama_cpp

    version = llama_cpp.__version__
    found = sorted(CACHE.glob(f"llama*python-{version}"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "--dest"]
        subprocess.run([*pip, str(CACHE), f"llama-cpp-python=={version}"], check=True)
        archive = next(CACHE.glob(f"llama*python-{version}.tar.gz"))
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(CACHE)], check=True)
        found = sorted(CACHE.glob(f"llama*python-{version}"))
    return found[0] / "vendor" / "llama.cpp"


def ensure_sentencepiece() -> None:
    if not (DEPS / "sentencepiece").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(DEPS), "sentencepiece"]
        subprocess.run(pip, check=True)
    if str(DEPS) not in sys.path:
        sys.path.append(str(DEPS))


def bpe_tokenizer(out: Path, pre: str) -> None:
    """SmolLM2's tokenizer (vocab and merges from the bundled GGUF) with the pre-tokenizer `pre`."""
    from transformers import AutoTokenizer

    from localrun.models.catalog import default_model_path
    from localrun.quantize.to_gguf import restore_pre_tokenizer

    gguf = default_model_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    restore_pre_tokenizer(out, pre)
    if pre == "qwen2":
        tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        tok["normalizer"] = {"type": "NFC"}
        (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
GEMMA_TURNS = ["<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def spm_tokenizer(out: Path) -> int:
    """A Gemma-style SentencePiece BPE model (byte fallback, specials at Gemma's ids); returns its size."""
    ensure_sentencepiece()
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXT),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=GEMMA_TURNS,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    decoder = {str(i): {"content": t, "special": True} for i, t in enumerate(GEMMA_SPECIALS)}
    decoder |= {str(processor.piece_to_id(t)): {"content": t, "special": True} for t in GEMMA_TURNS}
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config |= {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder}
    config |= {"chat_template": GEMMA_TEMPLATE, "tokenizer_class": "GemmaTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return processor.vocab_size()


def tiny_model(kind: str, tok_dir: Path, out: Path, vocab_size: int, *, bf16: bool = False) -> Path:
    """A random tiny checkpoint of `kind` (llama, qwen3, gemma3) saved as safetensors beside its tokenizer."""
    import torch
    import transformers

    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128)
    common |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
        rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config = transformers.LlamaConfig(**common, num_hidden_layers=2, rope_parameters=rope, bos_token_id=1)
        model_cls = transformers.LlamaForCausalLM
    elif kind == "qwen3":
        rope = {"rope_type": "default", "rope_theta": 1e6}
        config = transformers.Qwen3Config(**common, num_hidden_layers=2, head_dim=32, rope_parameters=rope)
        config.tie_word_embeddings = True
        model_cls = transformers.Qwen3ForCausalLM
    else:
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        rope["full_attention"] = {"rope_type": "default", "rope_theta": 1e6}
        config = transformers.Gemma3TextConfig(
            **common, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32, sliding_window=8, rope_parameters=rope
        )
        model_cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name and kind != "gemma3" else 0.0) + 0.15 * torch.randn_like(param))
    (model.to(torch.bfloat16) if bf16 else model).save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def convert_llama_cpp(vendor: Path, hf_dir: Path, out: Path, out_type: str, pre: str) -> bool:
    """Convert with llama.cpp's converter; True when its pre-tokenizer hash lookup had to be forced."""
    env = {**os.environ, "PARITY_VENDOR": str(vendor), "PARITY_PRE": pre, "PYTHONPATH": str(DEPS)}
    cmd = [sys.executable, "-c", RUNNER, str(hf_dir), "--outfile", str(out), "--outtype", out_type.lower()]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=vendor)
    if done.returncode != 0:
        sys.exit(f"llama.cpp's converter failed on {hf_dir.name}:\n{done.stderr[-3000:]}")
    return "PARITY: pre-tokenizer forced" in done.stderr


def _value(field: Any) -> Any:
    value = field.contents()
    return value.tolist() if hasattr(value, "tolist") else value


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, list[int], bytes]], list[str]]:
    """(metadata, tensors by name as (type, shape, bytes), tensor order) of one GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {k: (f.types[0].name if f.types else None, _value(f)) for k, f in reader.fields.items()}
    for k in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
        meta.pop(k, None)
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape], t.data.tobytes()) for t in reader.tensors}
    return meta, tensors, [t.name for t in reader.tensors]


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    a_meta, a_tensors, a_order = read_gguf(ours)
    b_meta, b_tensors, b_order = read_gguf(theirs)
    keys: list[dict[str, Any]] = []
    for key in sorted(set(a_meta) | set(b_meta)):
        if a_meta.get(key) != b_meta.get(key):
            show = [_short(m.get(key)) for m in (a_meta, b_meta)]
            keys.append({"key": key, "ours": show[0], "llama_cpp": show[1], "why": EXPECTED_DIFFS.get(key)})
    tensors = []
    for name in sorted(set(a_tensors) | set(b_tensors)):
        a, b = a_tensors.get(name), b_tensors.get(name)
        if a != b:
            what = "missing in ours" if a is None else "missing in llama.cpp's" if b is None else None
            if what is None:
                parts = ("type", "shape", "bytes")
                what = ", ".join(p for p, x, y in zip(parts, a, b, strict=True) if x != y) + " differ"
            tensors.append({"tensor": name, "diff": what})
    same_file = ours.read_bytes() == theirs.read_bytes()
    return {
        "keys": len(b_meta),
        "tensors": len(b_tensors),
        "key_diffs": keys,
        "tensor_diffs": tensors,
        "key_order_same": list(a_meta) == list(b_meta),
        "tensor_order_same": a_order == b_order,
        "file_bytes_identical": same_file,
    }


def _short(value: Any) -> Any:
    if isinstance(value, tuple) and isinstance(value[1], list) and len(value[1]) > 6:
        return [value[0], f"list of {len(value[1])}", value[1][:3]]
    if isinstance(value, tuple) and isinstance(value[1], str) and len(value[1]) > 60:
        return [value[0], value[1][:60] + "..."]
    return value


VARIANTS = {  # name -> (kind, pre-tokenizer or "spm", checkpoint saved in BF16 as real ones are)
    "llama": ("llama", "smollm", False),
    "qwen3": ("qwen3", "qwen2", False),
    "qwen3-smollm": ("qwen3", "smollm", False),
    "gemma3": ("gemma3", "spm", False),
    "gemma3-bf16": ("gemma3", "spm", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-type", nargs="+", default=["F32", "F16", "BF16"])
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS))
    parser.add_argument("--keep", type=Path, help="build in this directory and keep the files")
    args = parser.parse_args()
    from localrun.quantize.to_gguf import convert_hf_to_gguf

    vendor = llama_cpp_vendor()
    ensure_sentencepiece()
    rows = []
    with tempfile.TemporaryDirectory(prefix="converter-parity-") as tmp_dir:
        tmp = args.keep or tmp_dir
        for name in args.variant:
            kind, pre, bf16 = VARIANTS[name]
            base = Path(tmp) / name
            if pre == "spm":
                vocab = spm_tokenizer(base / "tok") + 2  # padded like Gemma's embedding rows
            else:
                bpe_tokenizer(base / "tok", pre)
                vocab = 49152
            hf_dir = tiny_model(kind, base / "tok", base / f"tiny-{name}", vocab, bf16=bf16)
            for out_type in args.out_type:
                ours = convert_hf_to_gguf(hf_dir, base / f"ours-{out_type}.gguf", out_type=out_type).path
                theirs = base / f"llama-cpp-{out_type}.gguf"
                forced = convert_llama_cpp(vendor, hf_dir, theirs, out_type, pre)
                row = {"variant": name, "arch": kind, "out_type": out_type, "pre_tokenizer_forced": forced}
                rows.append(row | compare(ours, theirs))
    head = f"{'variant':14} {'type':5} {'keys':>5} {'tensors':>7} {'key diffs':>9} {'tensor diffs':>12}"
    print(f"{head}  file identical  pre forced")
    for r in rows:
        print(
            f"{r['variant']:14} {r['out_type']:5} {r['keys']:5} {r['tensors']:7} {len(r['key_diffs']):9} "
            f"{len(r['tensor_diffs']):12}  {str(r['file_bytes_identical']):14}  {r['pre_tokenizer_forced']}"
        )
        for d in r["key_diffs"]:
            print(f"    key {d['key']}: ours {d['ours']!r} vs llama.cpp {d['llama_cpp']!r}  {d['why'] or ''}")
        for d in r["tensor_diffs"]:
            print(f"    tensor {d['tensor']}: {d['diff']}")
    import llama_cpp

    result = {"llama_cpp_python": llama_cpp.__version__, "converter": str(vendor.relative_to(CACHE)), "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "converter-parity.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {(RESULTS / 'converter-parity.json').relative_to(REPO)}")


if __name__ == "__main__":
    main()

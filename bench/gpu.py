"""GPU benchmark of the transformers backend: attention kernels, static cache + torch.compile, NF4;
and speculative decoding on both backends.

    python bench/gpu.py                      # SmolLM2-135M and a ~1B random llama, all variants
    python bench/gpu.py --models llama-1b --n-gen 256
    python bench/gpu.py --spec-only          # speculative decoding only (SmolLM2: lookup, self-draft)

Each variant is loaded fresh and measured with localrun.bench.run_bench (ours and the bare
model.generate() loop, back to back, medians). Writes bench/results/gpu-<device>.json. The goal
on the 1B config: static cache + compile decodes at least 2x as fast as the dynamic eager baseline.

Speculative decoding (localrun.bench.run_spec_bench: plain and drafted, interleaved, greedy, 256 tokens)
runs on SmolLM2 with prompt lookup on a copy-from-input prompt and with the model drafting for itself,
on the transformers backend and, where llama-cpp-python was built with CUDA, on llama.cpp (the default
GGUF). No smaller model shares SmolLM2's tokenizer offline, so there is no small-draft pair here.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

# name -> LoadOptions fields (device cuda and bf16 are added for every variant)
VARIANTS: dict[str, dict] = {
    "eager": {"attn": "eager"},
    "sdpa": {"attn": "sdpa"},
    "flash_attention_2": {"attn": "flash_attention_2"},
    "static": {"attn": "sdpa", "static_cache": True},
    "static+compile": {"attn": "sdpa", "static_cache": True, "compile": True},
    "nf4": {"attn": "sdpa", "quant": "nf4"},
}
# Llama-3.2-1B's shape with SmolLM2's vocabulary, so its tokenizer fits: about 1.07B parameters
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)


def build_models(names: list[str], workdir: Path) -> dict[str, Path]:
    """Model directories (bf16 safetensors): SmolLM2 dequantized from the default GGUF, and the 1B config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from localrun.backends import load_backend
    from localrun.settings import LoadOptions

    smol = load_backend(None, LoadOptions(backend="hf", device="cpu"))
    tok = smol.tokenizer
    out: dict[str, Path] = {}
    if "smollm2" in names:
        out["smollm2"] = workdir / "smollm2"
        smol.model.hf_quantizer = None  # the dequantized GGUF keeps its loader, which blocks saving
        if hasattr(smol.model.config, "quantization_config"):
            del smol.model.config.quantization_config
        smol.model.to(torch.bfloat16).save_pretrained(out["smollm2"])
        tok.save_pretrained(out["smollm2"])
    if "llama-1b" in names:
        out["llama-1b"] = workdir / "llama-1b"
        config = LlamaConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **LLAMA_1B
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out["llama-1b"])
        tok.save_pretrained(out["llama-1b"])
    smol.close()
    return out


def run_variant(path: Path, variant: str, args: argparse.Namespace) -> dict:
    """Load one variant, bench it, free the GPU; errors are recorded, not raised."""
    import torch

    from localrun.backends import load_backend
    from localrun.bench import run_bench
    from localrun.settings import LoadOptions

    if variant == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return {"skipped": "flash-attn is not installed (the sdpa variant uses torch's own flash kernel where it can)"}
    n_ctx = args.n_prompt + args.n_gen + 64  # the static cache is sized to this
    options = LoadOptions(backend="hf", device="cuda", dtype="bfloat16", n_ctx=n_ctx, **VARIANTS[variant])
    torch.cuda.reset_peak_memory_stats()
    backend = None
    try:
        backend = load_backend(path, options)
        result = run_bench(backend, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=args.reps)
        report = backend.report
        return {
            "attn": report.attn,
            "kv_cache": report.kv_cache,
            "load_s": report.load_s,
            "warmup_s": report.warmup_s,
            "weights_bytes": report.weights_bytes,
            "peak_vram_bytes": int(torch.cuda.max_memory_allocated()),
            "decode_tps": result["ours"]["median"]["decode_tps"],
            "ttft_s": result["ours"]["median"]["ttft_s"],
            "bare_decode_tps": result["bare"]["median"]["decode_tps"],
            "decode_ours_over_bare": result["ratios"]["decode_ours_over_bare"],
        }
    except Exception as exc:  # one broken variant must not lose the others' numbers
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if backend is not None:
            backend.close()
        del backend
        gc.collect()
        torch.cuda.empty_cache()


COPY = (
    "Repeat this list with one change, replacing plums with peaches, and keep everything else exactly: "
    + ", ".join(
        f"item {i}: {w}" for i, w in enumerate("apples pears plums cherries grapes lemons limes melons".split())
    )
    + "."
)
SPEC_CASES = {"lookup": ({"lookup": True}, COPY), "self-draft": ({"draft": "SELF", "draft_max": 4}, None)}


def run_speculative(smollm2: Path, args: argparse.Namespace) -> dict:
    """Speedup and acceptance per backend and case; errors and missing builds are recorded, not raised."""
    from localrun.hardware import llama_cpp_build
    from localrun.models.catalog import default_model_path

    targets = {"hf": (smollm2, {"backend": "hf", "dtype": "bfloat16"})}
    if llama_cpp_build()["cuda"]:
        targets["llamacpp"] = (default_model_path(), {"backend": "llamacpp", "n_gpu_layers": -1})
    out: dict = {} if "llamacpp" in targets else {"llamacpp": {"skipped": "llama-cpp-python has no CUDA build"}}
    for backend, (path, load) in targets.items():
        out[backend] = {}
        for case, (extra, prompt) in SPEC_CASES.items():
            extra = {k: str(path) if v == "SELF" else v for k, v in extra.items()}
            out[backend][case] = row = _spec_case(path, {**load, **extra}, prompt, args)
            print(f"speculative {backend:<9} {case:<11} {_fmt_spec(row)}", flush=True)
    return out


def _spec_case(path: Path, fields: dict, prompt: str | None, args: argparse.Namespace) -> dict:
    import torch

    from localrun.backends import load_backend
    from localrun.bench import SPEC_PROMPT, run_spec_bench
    from localrun.settings import LoadOptions

    backend = None
    try:
        backend = load_backend(path, LoadOptions(device="cuda", n_ctx=1024, **fields))
        return run_spec_bench(backend, prompt=prompt or SPEC_PROMPT, n_gen=256, reps=args.reps)
    except Exception as exc:  # one failing case must not lose the others' numbers
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if backend is not None:
            backend.close()
        del backend
        gc.collect()
        torch.cuda.empty_cache()


def _fmt_spec(row: dict) -> str:
    if "speedup" not in row:
        return row.get("error") or row.get("skipped", "")
    acc = "n/a" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.0%}"
    return (
        f"plain {row['plain_decode_tps']:7.1f} tok/s  drafted {row['draft_decode_tps']:7.1f} tok/s  "
        f"speedup {row['speedup']:.2f}x  acceptance {acc}  same text {row['same_text']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama-1b", help="comma-separated: smollm2, llama-1b")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--spec-only", action="store_true", help="only the speculative-decoding cases")
    parser.add_argument("--no-spec", action="store_true", help="skip the speculative-decoding cases")
    parser.add_argument("-o", "--output", type=Path, help="default: bench/results/gpu-<device>.json")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench/gpu.py: torch is not installed.", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device: this benchmark needs an NVIDIA GPU.", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    results: dict = {"device": device, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": args.reps}
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="localrun-gpu-bench-") as tmp:
        paths = build_models(sorted({*models, "smollm2"}) if not args.no_spec else models, Path(tmp))
        for name, path in paths.items():
            if args.spec_only or name not in models:
                continue
            results[name] = {}
            for variant in args.variants.split(","):
                results[name][variant] = row = run_variant(path, variant, args)
                print(f"{name:<10} {variant:<18} {_fmt(row)}", flush=True)
        if not args.no_spec:
            results["speculative"] = run_speculative(paths["smollm2"], args)
    results["goal"] = _goal(results.get("llama-1b", {}))
    from localrun.bench import machine_info

    results["machine"] = machine_info()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    output = args.output or Path(__file__).resolve().parent / "results" / f"gpu-{slug}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"goal: {results['goal']}\nwrote {output}")
    return 0


def _fmt(row: dict) -> str:
    if "decode_tps" not in row:
        return row.get("error") or row.get("skipped", "")
    return (
        f"decode {row['decode_tps']:8.1f} tok/s (bare {row['bare_decode_tps']:8.1f})  "
        f"TTFT {row['ttft_s'] * 1000:7.1f} ms  warm-up {row['warmup_s']:6.1f} s  "
        f"weights {row['weights_bytes'] / 1e9:5.2f} GB  peak {row['peak_vram_bytes'] / 1e9:5.2f} GB"
    )


def _goal(rows: dict) -> dict:
    """static+compile decode tok/s over dynamic eager on the 1B config (goal: >= 2)."""
    fast, base = rows.get("static+compile", {}), rows.get("eager", {})
    if "decode_tps" not in fast or "decode_tps" not in base:
        return {"speedup": None, "met": None}
    speedup = fast["decode_tps"] / base["decode_tps"]
    return {"speedup": speedup, "met": speedup >= 2.0}


if __name__ == "__main__":
    sys.exit(main())

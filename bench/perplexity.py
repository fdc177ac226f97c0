"""Perplexity / KL-divergence parity with llama.cpp's `llama-perplexity`, and the monotone-quality run.

    python bench/perplexity.py                      # parity (needs /work/llama-tools/bin/llama-perplexity)
    python bench/perplexity.py --monotone           # also F16, Q8_0, Q5_K_M, Q4_0, Q2_K + NF4 on SmolLM2
    python bench/perplexity.py --ctx 128 --chars 6000   # a quick check on part of the text

Parity: our PPL of the bundled text on the default model and on an F16 made from it by our converter
equals `llama-perplexity -f TEXT -c CTX` within 1 %; our mean KLD of Q4_0 against the F16 reference
equals `llama-perplexity --kl-divergence` within 5 %. Monotone: KLD rises as reported bits per weight
fall, and the whole comparison finishes in under 10 minutes. Writes bench/results/perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localrun.evaluate import quality as evaluate  # noqa: E402
from localrun.evaluate.compare import CompareRequest, Variant, build_variants, run_compare  # noqa: E402
from localrun.hardware import physical_cores  # noqa: E402
from localrun.models.catalog import default_model_path  # noqa: E402

TOOLS = Path(os.environ.get("LLAMA_TOOLS", "/work/llama-tools/bin"))
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s+([0-9.]+)")
_KLD_P99 = re.compile(r"99\.0%\s+KLD:\s+([0-9.]+)")
_SAME_TOP = re.compile(r"Same top p:\s+([0-9.]+)")


def _llama_perplexity(*args: str) -> str:
    exe = TOOLS / "llama-perplexity"
    cmd = [str(exe), *args, "-t", str(physical_cores()), "--no-warmup"]
    print("$", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def _match(pattern: re.Pattern, text: str) -> float:
    m = pattern.search(text)
    if not m:
        raise RuntimeError(f"no {pattern.pattern!r} in llama-perplexity's output: {text[-1500:]}")
    return float(m.group(1))


def ours_ppl(model: Path, text: str, n_ctx: int) -> float:
    scorer = evaluate.LlamaCppScorer(model, n_ctx=n_ctx)
    try:
        return evaluate.perplexity(scorer, evaluate.tokenize_once(scorer, text, n_ctx=n_ctx))[0]
    finally:
        scorer.close()


def ours_kld(base: Path, variant: Path, text: str, n_ctx: int) -> dict:
    scorer = evaluate.LlamaCppScorer(base, n_ctx=n_ctx)
    try:
        ref = evaluate.build_reference(scorer, evaluate.tokenize_once(scorer, text, n_ctx=n_ctx))
    finally:
        scorer.close()
    other = evaluate.LlamaCppScorer(variant, n_ctx=n_ctx)
    try:
        q = evaluate.evaluate(other, ref)
    finally:
        other.close()
    return q.as_dict() | {"ref_tail_mass_mean": float(ref.tail_mass.mean())}


def parity(text_file: Path, text: str, n_ctx: int, f16: Path, q4_0: Path) -> dict:
    out: dict = {"ppl": {}, "kld": {}}
    for name, model in (("default Q4_1", default_model_path()), ("F16", f16)):
        theirs = _match(_PPL, _llama_perplexity("-m", str(model), "-f", str(text_file), "-c", str(n_ctx)))
        ours = ours_ppl(model, text, n_ctx)
        rel = abs(ours / theirs - 1)
        out["ppl"][name] = {"ours": ours, "llama_perplexity": theirs, "rel_diff": rel, "holds_1pct": rel <= 0.01}
        print(f"PPL {name:<13} ours {ours:.4f}  llama-perplexity {theirs:.4f}  diff {100 * rel:.3f} %")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "f16.kld"
        _llama_perplexity("-m", str(f16), "-f", str(text_file), "-c", str(n_ctx), "--kl-divergence-base", str(base))
        log = _llama_perplexity("-m", str(q4_0), "-c", str(n_ctx), "--kl-divergence-base", str(base), "--kl-divergence")
    theirs = {"kld_mean": _match(_KLD, log), "kld_p99": _match(_KLD_P99, log), "same_top_pct": _match(_SAME_TOP, log)}
    ours = ours_kld(f16, q4_0, text, n_ctx)
    rel = abs(ours["kld_mean"] / theirs["kld_mean"] - 1)
    out["kld"] = {"ours": ours, "llama_perplexity": theirs, "rel_diff": rel, "holds_5pct": rel <= 0.05}
    print(
        f"KLD Q4_0 vs F16  ours {ours['kld_mean']:.5f}  llama-perplexity {theirs['kld_mean']:.5f}  diff {100 * rel:.2f} %"
    )
    return out


def monotone(text_file: Path, n_ctx: int) -> dict:
    req = CompareRequest(
        quants=("F16", "Q8_0", "Q5_K_M", "Q4_0", "Q2_K"), nf4=True, text_path=str(text_file), n_ctx=n_ctx
    )
    started = time.perf_counter()
    rows = []
    for event in run_compare(req):
        if event.stage == "row" and event.row is not None:
            r = event.row
            rows.append(r.as_dict())
            print(f"  {r.label:<7} bpw {r.bits_per_weight or float('nan'):5.2f}  KLD {r.kld_mean}  error {r.error}")
    elapsed = time.perf_counter() - started
    ok = [r for r in rows if not r["error"] and r["label"] != "F16" and r["bits_per_weight"] is not None]
    by_bits = sorted(ok, key=lambda r: -r["bits_per_weight"])
    klds = [r["kld_mean"] for r in by_bits]
    holds = all(a < b for a, b in zip(klds, klds[1:], strict=False))
    print(f"monotone {holds} ({' > '.join(r['label'] for r in by_bits)} by bpw); {elapsed:.0f} s (limit 600 s)")
    return {"rows": rows, "elapsed_s": elapsed, "kld_rises_as_bpw_falls": holds, "under_10_min": elapsed < 600}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chars", type=int, default=0, help="use only the first N characters of the text")
    parser.add_argument("--monotone", action="store_true", help="also run the monotone-quality comparison")
    parser.add_argument("--no-parity", action="store_true", help="skip the llama-perplexity parity run")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "bench" / "results" / "perplexity.json")
    args = parser.parse_args()

    text = evaluate.read_text(None)
    text_file = evaluate.bundled_text_path()
    if args.chars:
        text = text[: args.chars]
        text_file = Path(tempfile.mkdtemp()) / "text.txt"
        text_file.write_text(text, encoding="utf-8")
    variants = [v for v in build_variants(CompareRequest(quants=("F16", "Q4_0"))) if isinstance(v, Variant)]
    f16, q4_0 = (v.path for v in variants)
    result: dict = {"n_ctx": args.ctx, "text_chars": len(text), "threads": physical_cores(), "f16": str(f16)}
    if not args.no_parity:
        if not (TOOLS / "llama-perplexity").is_file():
            print(f"no llama-perplexity in {TOOLS}: build it with bench/llama_tools.sh", file=sys.stderr)
            return 2
        result["parity"] = parity(text_file, text, args.ctx, f16, q4_0)
    if args.monotone:
        result["monotone"] = monotone(text_file, args.ctx)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

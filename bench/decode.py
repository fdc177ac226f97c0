"""Plain decode and prompt processing: ours (`localrun bench`) against llama.cpp's `llama-bench`, same
file and threads, each side with its own defaults (llama-bench: -fa auto, -b 2048, -ub 512), interleaved.

    python bench/decode.py [--model M.gguf] [--threads N] [--reps 3] [--n-gen 128] [--depth 512]

Records decode tok/s at depth 512 (llama-bench -p 0 -n 128 -d 512) and pp512 (llama-bench -p 512 -n 0)
vs our decode tok/s after a 512-token prompt and our TTFT; writes bench/results/decode-cpu.json.
"""

from __future__ import annotations

import argparse
import json

from _common import default_model, llama_tool, localrun, median, physical_cores, run, write_result


def llama_bench(model: str, threads: int, *args: str) -> dict:
    out = run([str(llama_tool("llama-bench")), "-m", model, "-t", str(threads), "-r", "1", "-o", "json", *args])
    rows = json.loads(out.stdout)
    return rows[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--name", default="decode-cpu")
    a = ap.parse_args()
    model = a.model or str(default_model())
    threads = a.threads or physical_cores()
    ours_tg, ours_ttft, theirs_tg, theirs_pp_s, settings = [], [], [], [], {}
    for rep in range(a.reps):
        for side in ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours"):
            if side == "ours":
                r = json.loads(
                    localrun(
                        "bench",
                        model,
                        "--json",
                        "--reps",
                        "1",
                        "--n-prompt",
                        str(a.depth),
                        "--n-gen",
                        str(a.n_gen),
                        "--n-threads",
                        str(threads),
                    ).stdout
                )
                ours_tg.append(r["ours"]["median"]["decode_tps"])
                ours_ttft.append(r["ours"]["median"]["ttft_s"])
                settings["ours"] = {"n_ctx": r["n_ctx"], "n_threads": r["n_threads"], "flash_attn": "auto"}
            else:
                tg = llama_bench(model, threads, "-p", "0", "-n", str(a.n_gen), "-d", str(a.depth))
                pp = llama_bench(model, threads, "-p", str(a.depth), "-n", "0")
                theirs_tg.append(tg["avg_ts"])
                theirs_pp_s.append(a.depth / pp["avg_ts"])
                settings["llama-bench"] = {
                    k: tg.get(k) for k in ("n_threads", "n_batch", "n_ubatch", "flash_attn", "type_k", "build_commit")
                }
    result = {
        "model": model,
        "threads": threads,
        "reps": a.reps,
        "depth": a.depth,
        "n_gen": a.n_gen,
        "ours": {"decode_tps": ours_tg, "ttft_s": ours_ttft},
        "llama_bench": {"decode_tps": theirs_tg, "pp_s": theirs_pp_s},
        "ratios": {
            "decode_ours_over_llama_bench": median(ours_tg) / median(theirs_tg),
            "ttft_ours_over_llama_bench_pp": median(ours_ttft) / median(theirs_pp_s),
        },
        "settings": settings,
    }
    path = write_result(a.name, result)
    r = result["ratios"]
    print(
        f"decode: ours {median(ours_tg):.1f} tok/s, llama-bench {median(theirs_tg):.1f} tok/s, ratio {r['decode_ours_over_llama_bench']:.3f} (goal >= 0.95)"
    )
    print(
        f"TTFT {median(ours_ttft) * 1000:.1f} ms vs pp{a.depth} {median(theirs_pp_s) * 1000:.1f} ms, ratio {r['ttft_ours_over_llama_bench_pp']:.3f} (goal <= 1.05)"
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()

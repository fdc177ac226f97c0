"""Switching between two loaded models: TTFT on one `localrun serve` holding both (the model pool) against a
warm single-model server per model, in the same run, requests interleaved.

The two models are the default and its Q8_0 (made once by our quantizer, cached under ~/.cache/localrun/bench).
Each of the --requests requests to the pool server alternates the model (so every one is a switch); right
beside it, the same request goes to that model's own warm server (which goes first alternates). A third server with --keep-alive 0
unloads after every request, which is what a switch cost before the pool (a reload each time).
The goal is a pool/warm TTFT ratio <= 1.2.

Run: python bench/models_switch.py [--requests 20] [--out bench/results/models-switch.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import serve, stream_chat  # noqa: E402

MESSAGES = [{"role": "user", "content": "Give me three tips for learning to cook."}]
CACHE = Path.home() / ".cache" / "localrun" / "bench"


def q8_model() -> Path:
    from localrun.models.catalog import default_model_path
    from localrun.quantize.gguf_quant import quantize_gguf

    path = CACHE / "smollm2-Q8_0.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        quantize_gguf(default_model_path(), path, "Q8_0", allow_requantize=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "models-switch.json")
    args = parser.parse_args()
    import openai

    home = Path(tempfile.mkdtemp(prefix="localrun-switch-"))
    folder = home / "models" / "local" / "smol"
    folder.mkdir(parents=True)
    (folder / "smol-q8.gguf").symlink_to(q8_model())
    os.environ["LOCALRUN_HOME"] = str(home)  # the servers below inherit it
    default, second = "smollm2-135m-instruct", "local/smol:smol-q8.gguf"
    common = ("--n-ctx", "1024", "--parallel", "1")
    rows = []
    with contextlib.ExitStack() as stack:
        warm = {
            default: stack.enter_context(serve(*common)),
            second: stack.enter_context(serve(str(folder / "smol-q8.gguf"), *common)),
        }
        pool = stack.enter_context(serve(*common))
        reload = stack.enter_context(serve(*common, "--keep-alive", "0"))

        def client(base: str):
            return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

        clients = {name: client(base) for name, base in {**warm, "pool": pool, "reload": reload}.items()}
        warm_ids = {default: default, second: clients[second].models.list().data[0].id}
        kwargs = {"temperature": 0, "max_tokens": args.max_tokens}
        for name in (default, second):  # every server has answered once: only the switches are measured
            stream_chat(clients[name], warm_ids[name], MESSAGES, **kwargs)
        stream_chat(clients["pool"], default, MESSAGES, **kwargs)
        for i in range(args.requests):
            model = second if i % 2 == 0 else default
            # which server goes first alternates too: the first request after a pause pays for waking the machine
            order = ("warm", "pool", "reload") if (i // 2) % 2 == 0 else ("pool", "warm", "reload")
            runs = {}
            for which in order:
                target = clients[model] if which == "warm" else clients[which]
                runs[which] = stream_chat(target, warm_ids[model] if which == "warm" else model, MESSAGES, **kwargs)
            base_run, pool_run, reload_run = runs["warm"], runs["pool"], runs["reload"]
            rows.append(
                {
                    "model": model,
                    "warm_ttft_s": base_run["ttft_s"],
                    "pool_ttft_s": pool_run["ttft_s"],
                    "reload_ttft_s": reload_run["ttft_s"],
                    "same_text": pool_run["text"] == base_run["text"],
                }
            )
            print(
                f"{i + 1:2d} {model:28s} warm {base_run['ttft_s']:.3f} s  pool {pool_run['ttft_s']:.3f} s  "
                f"reload {reload_run['ttft_s']:.3f} s",
                file=sys.stderr,
            )
    warm_med = statistics.median(r["warm_ttft_s"] for r in rows)
    pool_med = statistics.median(r["pool_ttft_s"] for r in rows)
    reload_med = statistics.median(r["reload_ttft_s"] for r in rows)
    per_request = [r["pool_ttft_s"] / r["warm_ttft_s"] for r in rows]
    result = {
        "bench": "models_switch",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "median_ttft_s": {"warm single-model": warm_med, "pool switching": pool_med, "reload each switch": reload_med},
        "pool_over_warm": pool_med / warm_med,
        "reload_over_warm": reload_med / warm_med,
        "per_request_ratio_p90": sorted(per_request)[int(0.9 * (len(per_request) - 1))],
        "same_text": sum(r["same_text"] for r in rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"TTFT median: warm {warm_med:.3f} s, pool switching {pool_med:.3f} s ({pool_med / warm_med:.2f}×), "
        f"reload each switch {reload_med:.3f} s ({reload_med / warm_med:.2f}×); same text {result['same_text']}/{len(rows)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

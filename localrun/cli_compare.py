"""`localrun compare`: quantization levels side by side; prints each row as its variant finishes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

_EXAMPLES = """examples:
  localrun compare default --quants F16,Q8_0,Q5_K_M,Q4_0,Q2_K --nf4
  localrun compare ./my-hf-model --quants Q8_0,Q4_K_M --int8 --prompt "Name three primes."
  localrun compare default --quants Q4_0 --text my-notes.txt --out results/
"""


def register(subparsers: Any) -> None:
    """Add the `compare` subcommand."""
    from localrun.compare import DEFAULT_PROMPT, DEFAULT_QUANTS

    p = subparsers.add_parser(
        "compare",
        help="compare quantization levels: size, speed, memory, perplexity, KL-divergence, answers",
        description=(
            "Build the missing variants (cached in the store), run each in its own process, and print one row "
            "per variant as it finishes. Quality is measured against an F16 reference made by our converter."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="a .gguf, an HF model directory, or 'default'")
    p.add_argument(
        "--quants", default=",".join(DEFAULT_QUANTS), help="comma-separated GGUF types (F16 is the reference)"
    )
    p.add_argument("--nf4", action="store_true", help="also compare bitsandbytes NF4 (transformers)")
    p.add_argument("--int8", action="store_true", help="also compare bitsandbytes INT8 (transformers)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt each variant answers greedily")
    p.add_argument("--text", default=None, help="evaluation text file (default: the bundled public-domain text)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens (default 512, as llama.cpp)")
    p.add_argument("--max-tokens", type=int, default=48, help="answer length in tokens (default 48)")
    p.add_argument("--no-quality", action="store_true", help="skip perplexity and KL-divergence")
    p.add_argument("--out", default=None, help="write compare.json, compare.csv and charts here")
    p.add_argument("--cache-dir", default=None, help="where variants are built (default: the model store)")
    p.set_defaults(func=handle)


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def handle(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    from localrun.compare import CompareRequest, parse_quants, run_compare
    from localrun.compare_report import format_row, header, write_outputs
    from localrun.errors import UserError

    out = out or sys.stdout
    if args.ctx < 16 or args.max_tokens < 1:
        raise UserError("--ctx must be at least 16 and --max-tokens at least 1.")
    req = CompareRequest(
        model=None if args.model in (None, "default") else args.model,
        quants=parse_quants(args.quants),
        nf4=args.nf4,
        int8=args.int8,
        prompt=args.prompt,
        text_path=args.text,
        n_ctx=args.ctx,
        max_tokens=args.max_tokens,
        quality=not args.no_quality,
        cache_dir=args.cache_dir,
    )
    n_total = len(set(req.quants) | {"F16"}) + int(req.nf4) + int(req.int8)
    rows = []
    started = time.perf_counter()
    tty = sys.stderr.isatty()
    print(header(), file=out, flush=True)
    for event in run_compare(req):
        if event.stage == "row" and event.row is not None:
            rows.append(event.row)
            print("\r\033[K" if tty else "", end="", file=sys.stderr)
            print(format_row(event.row), file=out, flush=True)
        elif event.stage != "token":
            line = f"{_bar(len(rows) / n_total)} {len(rows)}/{n_total} {event.label}: {event.message[:60]}"
            print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    print(f"{_bar(1.0)} {len(rows)}/{n_total} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.out:
        meta = {
            "model": args.model or "default",
            "quants": list(req.quants),
            "nf4": req.nf4,
            "int8": req.int8,
            "prompt": req.prompt,
            "text": str(Path(args.text).expanduser()) if args.text else "bundled:alice.txt",
            "n_ctx": req.n_ctx,
            "reference": "F16",
            "command": "localrun " + " ".join(sys.argv[1:]) if sys.argv else "",
        }
        for path in write_outputs(args.out, rows, meta).values():
            print(f"wrote {path}", file=sys.stderr)
    return 0

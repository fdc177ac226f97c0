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
  localrun compare --arena default --remote gpu-box:qwen3-32b       # this laptop against a GPU server
  localrun compare --arena gpu-box:qwen3-32b --remote http://10.0.0.7:8000/v1#llama-3.3-70b
  localrun compare default --quants Q8_0,Q4_0 --remote gpu-box:my-model --no-quality
"""


def register(subparsers: Any) -> None:
    """Add the `compare` subcommand."""
    from localrun.evaluate.compare import DEFAULT_PROMPT, DEFAULT_QUANTS

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
        "--quants",
        default=None,
        help=f"comma-separated GGUF types, F16 is the reference (default {','.join(DEFAULT_QUANTS)}; "
        "with --arena: none, the model as it is)",
    )
    p.add_argument("--nf4", action="store_true", help="also compare bitsandbytes NF4 (transformers)")
    p.add_argument("--int8", action="store_true", help="also compare bitsandbytes INT8 (transformers)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt each variant answers greedily")
    p.add_argument("--text", default=None, help="evaluation text file (default: the bundled public-domain text)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens (default 512, as llama.cpp)")
    p.add_argument("--max-tokens", type=int, default=48, help="answer length in tokens (default 48)")
    p.add_argument("--no-quality", action="store_true", help="skip perplexity and KL-divergence")
    p.add_argument(
        "--remote",
        action="append",
        default=[],
        metavar="ENGINE",
        help="also run a remote engine: a saved endpoint's NAME[:MODEL] or http://HOST:PORT/v1[#MODEL] "
        "(repeatable; no quality figures)",
    )
    p.add_argument(
        "--arena",
        action="store_true",
        help="answers and speed only: each variant's answer streams in turn, then the table (no perplexity)",
    )
    p.add_argument("--out", default=None, help="write compare.json, compare.csv and charts here")
    p.add_argument("--cache-dir", default=None, help="where variants are built (default: the model store)")
    p.set_defaults(func=handle)


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def handle(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    from localrun.errors import UserError
    from localrun.evaluate.compare import DEFAULT_QUANTS, CompareRequest, parse_quants, remote_variants
    from localrun.evaluate.report import label_width

    out = out or sys.stdout
    if args.ctx < 16 or args.max_tokens < 1:
        raise UserError("--ctx must be at least 16 and --max-tokens at least 1.")
    if args.quants is not None:
        quants = parse_quants(args.quants)
    else:
        quants = () if args.arena else DEFAULT_QUANTS
    req = CompareRequest(
        model=None if args.model in (None, "default") else args.model,
        quants=quants,
        nf4=args.nf4,
        int8=args.int8,
        prompt=args.prompt,
        text_path=args.text,
        n_ctx=args.ctx,
        max_tokens=args.max_tokens,
        quality=not args.no_quality and not args.arena,
        cache_dir=args.cache_dir,
        remotes=tuple(args.remote),
    )
    remotes = remote_variants(req)
    started = time.perf_counter()
    if args.arena:
        rows = _arena(req, out)
    else:
        levels = len(set(req.quants) | {"F16"}) + int(req.nf4) + int(req.int8)
        rows = _table(req, out, levels + len(remotes), label_width(["F16", *req.quants, *(v.label for v in remotes)]))
    print(f"{_bar(1.0)} {len(rows)} variants done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.out:
        from localrun.evaluate.report import write_outputs

        meta = {
            "model": args.model or "default",
            "quants": list(req.quants),
            "nf4": req.nf4,
            "int8": req.int8,
            "remotes": list(req.remotes),
            "arena": bool(args.arena),
            "prompt": req.prompt,
            "text": str(Path(args.text).expanduser()) if args.text else "bundled:alice.txt",
            "n_ctx": req.n_ctx,
            "reference": "F16",
            "command": "localrun " + " ".join(sys.argv[1:]) if sys.argv else "",
        }
        for path in write_outputs(args.out, rows, meta).values():
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _progress(line: str, tty: bool) -> None:
    print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def _table(req: Any, out: TextIO, n_total: int, width: int) -> list:
    """The quality run: one table row per variant as it finishes, progress on stderr."""
    from localrun.evaluate.compare import run_compare
    from localrun.evaluate.report import format_row, header

    rows = []
    tty = sys.stderr.isatty()
    print(header(width), file=out, flush=True)
    for event in run_compare(req):
        if event.stage == "row" and event.row is not None:
            rows.append(event.row)
            print("\r\033[K" if tty else "", end="", file=sys.stderr)
            print(format_row(event.row, width=width), file=out, flush=True)
        elif event.stage != "token":
            _progress(f"{_bar(len(rows) / n_total)} {len(rows)}/{n_total} {event.label}: {event.message[:60]}", tty)
    return rows


def _arena(req: Any, out: TextIO) -> list:
    """The arena: each variant's answer streams under its name in turn, then the table of speed and memory."""
    from localrun.evaluate.compare import run_compare
    from localrun.evaluate.report import format_arena_table

    rows = []
    tty = sys.stderr.isatty()
    for event in run_compare(req):
        if event.stage == "run":
            print(f"── {event.label} ──", file=out, flush=True)
        elif event.stage == "token":
            print(event.text, end="", file=out, flush=True)
        elif event.stage == "row" and event.row is not None:
            rows.append(event.row)
            row = event.row
            print(f"error: {row.error}" if row.error else "", file=out, flush=True)
            print(file=out, flush=True)
        else:
            _progress(f"{event.label}: {event.message[:70]}", tty)
            if tty:
                print(file=sys.stderr)
    print(format_arena_table(rows), file=out, flush=True)
    return rows

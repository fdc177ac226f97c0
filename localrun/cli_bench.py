"""`localrun bench` and `localrun devices`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from localrun.settings import LoadOptions, add_flags, from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure TTFT, prompt and generation tokens/s against the bare library",
        description="Benchmark a model: ours vs a bare library loop, same threads and context, in one run.",
    )
    p.add_argument(
        "model", nargs="?", help="a .gguf file, a model directory, or a catalog name (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--n-prompt", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument(
        "--n-gen", type=int, default=None, help="tokens to generate (default 128; 256 with --draft or --lookup)"
    )
    p.add_argument("--reps", type=int, default=5, help="repetitions; medians are reported (default 5)")
    p.add_argument(
        "--prompt", default=None, help="with --draft or --lookup: the chat prompt to answer (default: a short story)"
    )
    p.add_argument(
        "--until-eos",
        action="store_true",
        help="with --draft or --lookup: time the answer itself, up to its end-of-sequence (default: --n-gen tokens)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("-o", "--output", type=Path, help="also write the JSON result to this file")
    add_flags(p, LoadOptions)
    p.set_defaults(func=run_bench_cmd)

    d = sub.add_parser("devices", help="show the CPU, GPUs and memory localrun can use")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=run_devices)


def run_bench_cmd(args: argparse.Namespace) -> int:
    from localrun.backends import load_backend
    from localrun.bench import format_bench, run_bench
    from localrun.errors import UserError

    if args.n_prompt < 8 or (args.n_gen is not None and args.n_gen < 2) or args.reps < 1:
        raise UserError("--n-prompt must be at least 8, --n-gen at least 2 and --reps at least 1.")
    options = from_args(LoadOptions, args)
    speculative = bool(options.draft or options.lookup)
    backend = load_backend(args.model, options)
    try:
        if speculative:
            from localrun.bench import SPEC_PROMPT, format_spec_bench, run_spec_bench

            n_gen = args.n_gen or 256
            result = run_spec_bench(
                backend, prompt=args.prompt or SPEC_PROMPT, n_gen=n_gen, reps=args.reps, until_eos=args.until_eos
            )
        else:
            result = run_bench(backend, n_prompt=args.n_prompt, n_gen=args.n_gen or 128, reps=args.reps)
    finally:
        backend.close()
    text = json.dumps(result, indent=2)
    if args.output:
        from localrun.catalog import write_atomic

        write_atomic(args.output, (text + "\n").encode())
    if args.json:
        print(text)
    else:
        print("\n".join(format_spec_bench(result) if speculative else format_bench(result)))
    return 0


def run_devices(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from localrun.format import fmt_bytes
    from localrun.hardware import probe

    devices = probe()
    if args.json:
        print(json.dumps([asdict(d) for d in devices], indent=2))
        return 0
    for d in devices:
        line = f"{d.kind}:{d.index}  {d.name}  {fmt_bytes(d.free_bytes)} free of {fmt_bytes(d.total_bytes)}"
        if d.kind == "cpu":
            line += f"  {d.physical_cores} physical cores ({d.logical_cores} logical)"
        if d.driver:
            line += f"  driver {d.driver}"
        if d.compute_capability:
            line += f"  compute {d.compute_capability}"
        print(line)
    if len(devices) == 1:
        print("No GPU found (no NVIDIA driver, not Apple Silicon): models run on the CPU.", file=sys.stderr)
    return 0

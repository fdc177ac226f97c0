"""`localrun bench` and `localrun devices`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
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
    p.add_argument(
        "--reps", type=int, default=None, help="repetitions; medians are reported (default 5; rounds with --clients: 3)"
    )
    p.add_argument(
        "--prompt", default=None, help="with --draft or --lookup: the chat prompt to answer (default: a short story)"
    )
    p.add_argument(
        "--until-eos",
        action="store_true",
        help="with --draft or --lookup: time the answer itself, up to its end-of-sequence (default: --n-gen tokens)",
    )
    p.add_argument(
        "--clients",
        default=None,
        help="measure 1..N clients at once, e.g. 1,2,4: TTFT, prompt and generation tok/s per request and total "
        "throughput, through the model process serve uses, or the remote engine (the default for --backend remote: 1,2,4)",
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
    from localrun.bench import format_bench, format_load_bench, run_bench
    from localrun.errors import UserError

    if args.n_prompt < 8 or (args.n_gen is not None and args.n_gen < 2) or (args.reps is not None and args.reps < 1):
        raise UserError("--n-prompt must be at least 8, --n-gen at least 2 and --reps at least 1.")
    options = from_args(LoadOptions, args)
    speculative = bool(options.draft or options.lookup)
    if args.clients is not None or _is_remote(args.model, options):
        if speculative:
            raise UserError("--clients measures plain decoding: leave out --draft and --lookup (or --clients).")
        result = _load_bench(args, options)
        return _emit(args, result, format_load_bench(result))
    backend = load_backend(args.model, options)
    try:
        if speculative:
            from localrun.bench import SPEC_PROMPT, format_spec_bench, run_spec_bench

            n_gen = args.n_gen or 256
            result = run_spec_bench(
                backend, prompt=args.prompt or SPEC_PROMPT, n_gen=n_gen, reps=args.reps or 5, until_eos=args.until_eos
            )
        else:
            result = run_bench(backend, n_prompt=args.n_prompt, n_gen=args.n_gen or 128, reps=args.reps or 5)
    finally:
        backend.close()
    return _emit(args, result, format_spec_bench(result) if speculative else format_bench(result))


def _emit(args: argparse.Namespace, result: dict, table: Sequence[str]) -> int:
    text = json.dumps(result, indent=2)
    if args.output:
        from localrun.models.catalog import write_atomic

        write_atomic(args.output, (text + "\n").encode())
    print(text if args.json else "\n".join(table))
    return 0


def _is_remote(model: str | None, options: LoadOptions) -> bool:
    from localrun.models.endpoints import remote_target

    return options.backend == "remote" or bool(options.url) or remote_target(model) is not None


def parse_clients(spec: str | None) -> tuple[int, ...]:
    from localrun.bench import LOAD_CLIENTS
    from localrun.errors import UserError

    if spec is None:
        return LOAD_CLIENTS
    try:
        levels = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1 or max(levels) > 64:
        raise UserError(f"--clients takes numbers of clients from 1 to 64, e.g. 1,2,4, not {spec!r}.")
    return levels


def _load_bench(args: argparse.Namespace, options: LoadOptions) -> dict:
    """The same figures for a remote engine (requests straight to it) and a model here (through the model
    process and slots that serve uses), so the laptop and the GPU server are measured alike."""
    from localrun.bench import load_about, remote_sender, run_load_bench, worker_sender

    clients = parse_clients(args.clients)
    sizes = {
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen or 128,
        "reps": args.reps or 3,
    }
    if _is_remote(args.model, options):
        from localrun.backends import load_backend

        backend = load_backend(args.model, options)
        try:
            about = load_about(
                backend.report, slots=backend.report.parallel, engine=backend.engine, round_trip_s=backend.rtt_s
            )
            eos = "ignore_eos" in backend.fields  # an engine that cannot ignore EOS gives each answer's own length
            return run_load_bench(remote_sender(backend), about, clients=clients, ignore_eos=eos, **sizes)
        finally:
            backend.close()
    from localrun.engine.pool import ModelPool, PoolPolicy
    from localrun.server.engine import WorkerEngine

    if options.parallel is None:  # as serve: slots as the memory allows, so the bench measures what it serves
        options = options.replace(parallel=0)
    engine = WorkerEngine(ModelPool(PoolPolicy(keep_alive_s=float("inf"))), options=options, max_queue=max(clients) + 1)
    try:
        loaded = engine.load(args.model)
        about = load_about(loaded.report, slots=engine.status().get("slots"), engine="localrun (this machine)")
        return run_load_bench(worker_sender(engine), about, clients=clients, **sizes)
    finally:
        engine.close()


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

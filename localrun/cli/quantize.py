"""`localrun quantize`: HF -> GGUF, GGUF -> Q8_0/Q4_K_M/..., bitsandbytes NF4/INT8; consumes QuantProgress."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from localrun.errors import UserError

_EXAMPLES = """examples:
  localrun quantize ./SmolLM2-135M-Instruct --to Q4_K_M --to Q8_0 -o models/
  localrun quantize model-F16.gguf --to Q5_K_M
  localrun quantize ./my-hf-model --to F16            (HF -> GGUF only)
  localrun quantize ./my-hf-model --to NF4            (bitsandbytes, saved as a directory)
  localrun quantize default --to Q8_0 --allow-requantize
  localrun quantize --list-types
"""


def register(subparsers: Any) -> None:
    """Add the `quantize` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "quantize",
        help="convert a Hugging Face model to GGUF and quantize it (Q8_0, Q4_K_M, ..., NF4, INT8)",
        description="Convert and quantize a model. Several --to targets share one HF -> F16 conversion.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", nargs="?", default=None, help="HF model directory, .gguf file, or 'default'")
    parser.add_argument("--to", dest="targets", action="append", default=[], metavar="TYPE", help="output type")
    parser.add_argument("-o", "--out-dir", default=".", help="output directory (default: current directory)")
    parser.add_argument(
        "--allow-requantize", action="store_true", help="allow quantizing an already-quantized GGUF (lower quality)"
    )
    parser.add_argument("--pre-tokenizer", default=None, help="override the llama.cpp pre-tokenizer name")
    parser.add_argument("--threads", type=int, default=None, help="quantizer threads (default: physical cores)")
    parser.add_argument("--compute-dtype", default="bfloat16", help="NF4 compute dtype: bfloat16, float16, float32")
    parser.add_argument("--list-types", action="store_true", help="list the available target types and exit")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="NF4/INT8: allow .bin/.pt pickle weights (they can run code)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="NF4/INT8: run the model repository's own Python code"
    )
    parser.set_defaults(func=handle)


def _list_types(out: TextIO) -> None:
    from localrun.quantize import BNB_TYPES, FLOAT_TYPES
    from localrun.quantize.gguf_quant import EXCLUDED_TYPES, quant_types

    print("GGUF types: " + ", ".join(quant_types()), file=out)
    print("From a Hugging Face directory also: " + ", ".join(t for t in FLOAT_TYPES) + " (conversion only)", file=out)
    print("bitsandbytes (HF directory output): " + ", ".join(BNB_TYPES), file=out)
    skipped = ", ".join(f"{name} ({why})" for name, why in EXCLUDED_TYPES.items() if name != "GUESSED")
    print("Not offered: " + skipped, file=out)


def _format_result(result: Any) -> str:
    line = f"  {result.target:<7} {result.size_bytes / 2**20:9.1f} MiB  {result.bits_per_weight:6.2f} bits/weight  {result.path}"
    if result.tensor_types:
        hist = ", ".join(f"{name} x{count}" for name, count in result.tensor_types.items())
        line += f"\n          tensor types: {hist}"
    if result.fallbacks:
        line += f"\n          {len(result.fallbacks)} tensors fell back to another type, e.g. {result.fallbacks[0]}"
    return line


class _Progress:
    """Progress on one rewritten line on a terminal; in a pipe or a log file, plain lines at each
    stage and every tenth of the way (no carriage returns, no escape codes)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.tty = stream, stream.isatty()
        self._open = False  # a terminal line is being rewritten
        self._last: tuple[str, str, int] | None = None

    def update(self, event: Any) -> None:
        text = f"[{event.target} {event.stage} {event.fraction:4.0%}] {event.message[:70]}"
        key = (event.target, event.stage, int(event.fraction * 10))
        if self.tty:
            if self._open and key[:2] != (self._last or key)[:2]:
                print(file=self.stream)  # a new stage starts on a new line; the last one stays visible
            print(f"\r{text}\033[K", end="", file=self.stream, flush=True)
            self._open = True
        elif key != self._last:
            print(text, file=self.stream, flush=True)
        self._last = key

    def line(self, text: str) -> None:
        """A line of its own (ends a rewritten progress line first); empty text only closes it."""
        if self._open:
            print("\r\033[K" if text else "", end="" if text else "\n", file=self.stream)
            self._open = False
        if text:
            print(text, file=self.stream, flush=True)


def handle(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run the quantize subcommand; returns the exit status."""
    from localrun.quantize import run_quantize

    out = out or sys.stdout
    if args.list_types:
        _list_types(out)
        return 0
    if not args.targets:
        raise UserError("No target type given: pass --to TYPE (e.g. --to Q4_K_M); see --list-types.")
    results = []
    progress = _Progress(sys.stderr)
    events = run_quantize(
        args.src,
        args.targets,
        out_dir=args.out_dir,
        allow_requantize=args.allow_requantize,
        pre_tokenizer=args.pre_tokenizer,
        nthread=args.threads,
        compute_dtype=args.compute_dtype,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    for event in events:
        if event.stage == "warning":
            progress.line(f"warning: {event.message}")
        elif event.stage == "done" and event.result is not None:
            results.append(event.result)
            progress.line(event.message)
        else:
            progress.update(event)
    progress.line("")
    print("Results:", file=out)
    for result in results:
        print(_format_result(result), file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m localrun.cli.quantize`), used when the main CLI is not installed."""
    parser = argparse.ArgumentParser(prog="localrun")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`localrun models list|info|rm|search|fit` and `localrun pull`."""

from __future__ import annotations

import argparse
from pathlib import Path

from localrun.errors import UserError
from localrun.models import catalog
from localrun.models.store import delete, dir_size, local_models, removable
from localrun.settings import LoadOptions, add_flags, from_args


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def cmd_list(args: argparse.Namespace) -> int:
    rows = local_models()
    print(f"{'NAME':40} {'FORMAT':11} {'QUANT':9} {'SIZE':>10} {'CTX':>7}  PATH")
    for r in rows:
        ctx = str(r.context_length) if r.context_length else "?"
        print(f"{r.name:40} {r.format:11} {r.quant:9} {_size(r.size_bytes):>10} {ctx:>7}  {r.path}")
    if args.all:
        print("\nCatalog (pull with `localrun pull NAME[:QUANT]`):")
        for m in catalog.catalog():
            quants = ", ".join(dict.fromkeys(v.quant for v in m.variants))
            print(f"  {m.name:32} {m.parameter_count / 1e9:5.2f}B  ctx {m.context_length:>6}  {m.license:12} {quants}")
    return 0


def _gguf_path(spec: str) -> Path:
    """A GGUF path for a name or path, or a UserError."""
    resolved = catalog.resolve_model(spec)
    if resolved.kind != "gguf" or resolved.path is None:
        raise UserError(f"{spec} is a {resolved.kind} model: the fit estimate needs a GGUF file.")
    return resolved.path


def cmd_info(args: argparse.Namespace) -> int:
    resolved = catalog.resolve_model(args.model)
    if resolved.kind == "hf_dir" and resolved.path is not None:
        print(f"path: {resolved.path}\nsize on disk: {_size(dir_size(resolved.path))}")
        print((resolved.path / "config.json").read_text().strip())
        return 0
    from localrun.models.fit import model_rows
    from localrun.models.gguf_info import inspect_gguf

    for key, value in model_rows(inspect_gguf(resolved.path or args.model)):
        print(f"{key:34} {value}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    targets = removable(args.model)
    for target in targets:
        print(f"will delete {target}")
    if not args.yes:
        try:
            answer = input("Delete? [y/N] ").strip().lower()
        except EOFError:  # no terminal, or Ctrl-D: the answer is no
            answer = ""
            print()
        if answer not in ("y", "yes"):
            print("Nothing deleted.")
            return 1
    for target in delete(targets):
        print(f"deleted {target}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from localrun.models import hub

    results = hub.search(args.query, limit=args.limit)
    if not results:
        print(f"No GGUF or text-generation models match {args.query!r}.")
    for m in results:
        print(f"{m.repo}  [{m.kind}]  downloads {m.downloads:,}  likes {m.likes:,}")
        for f in m.files[: args.files]:
            print(f"    {f.name:60} {_size(f.size_bytes):>10}")
        if len(m.files) > args.files:
            print(f"    ... and {len(m.files) - args.files} more files")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from localrun.models import hub

    path = hub.pull(args.model)
    print(f"ready: {path}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from localrun.models import fit

    options = from_args(LoadOptions, args)  # the context and cache type `localrun chat` would load with
    draft = _gguf_path(args.draft) if args.draft else None
    report = fit.fit_report(_gguf_path(args.model), n_ctx=options.n_ctx, kv_type=options.kv_type, draft=draft)
    est = report.estimate
    for label, value in (
        ("weights", est.weights_bytes),
        (f"KV cache ({est.n_ctx} ctx, {est.kv_type})", est.kv_cache_bytes),
        ("compute buffers", est.compute_bytes),
        ("other (vocab, output)", est.overhead_bytes),
        ("draft model", est.draft_bytes),
        ("total", est.total_bytes),
    ):
        print(f"{label:32} {_size(value):>10}")
    print(f"{'free GPU memory (usable)':32} {_size(report.gpu_budget_bytes):>10}")
    print(f"{'free RAM':32} {_size(report.ram_available_bytes):>10}")
    print(f"verdict: {report.verdict}")
    if report.max_ctx:
        print(f"largest context that fits ({report.max_ctx_where}): {report.max_ctx}")
    else:
        print("no context size fits")
    return 0 if report.verdict != "does not fit" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `models` (list/info/rm/search/fit) and `pull` to the localrun command group."""
    models = subparsers.add_parser("models", help="list, inspect, remove, search and size models")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("list", help="models on disk (the default model always shows)")
    p.add_argument("--all", action="store_true", help="also list the whole catalog")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="GGUF metadata or a model directory's config")
    p.add_argument("model", help="catalog name, hub repo or path")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("rm", help="delete a downloaded model from the store")
    p.add_argument("model")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_rm)
    p = sub.add_parser("search", help="search the Hugging Face Hub for GGUF and text-generation models")
    p.add_argument("query")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--files", type=int, default=6, help="weight files shown per repo")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("fit", help="will it fit? memory estimate and verdict for this machine")
    p.add_argument("model")
    add_flags(p, LoadOptions, only=("n_ctx", "kv_type"))
    p.add_argument("--ctx", dest="n_ctx", type=int, default=None, help=argparse.SUPPRESS)  # its old name
    p.add_argument("--draft", default=None, help="draft model for speculative decoding")
    p.set_defaults(func=cmd_fit)
    pull = subparsers.add_parser("pull", help="download a model: catalog NAME[:QUANT] or REPO[:QUANT|FILE]")
    pull.add_argument("model")
    pull.set_defaults(func=cmd_pull)

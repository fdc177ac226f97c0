"""The model store: rm deletes only what `models list` shows, hub file names cannot escape the store, one pull per
destination at a time, pulls are validated on landing, and a UI on the network opens only listed models."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import gguf_corpus
import pytest
from hubserver import FakeHub, HubServer

from localrun.cli import main
from localrun.errors import UserError
from localrun.models import catalog, hub
from localrun.models.catalog import default_model_path, resolve_model
from localrun.models.store import allowed_spec, local_models, removable

REPO = "test-org/tiny-GGUF"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty localrun home and HF cache; returns the store root (<home>/models)."""
    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path / "home" / "models"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    from test_gguf_info import write_tiny_gguf

    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def filled(store: Path, tiny: Path, tmp_path: Path) -> Path:
    """A store with one GGUF and one cached safetensors repo, as pulls leave them."""
    dest = catalog.store_path(REPO, "tiny-Q8_0.gguf")
    dest.parent.mkdir(parents=True)
    shutil.copyfile(tiny, dest)
    snapshot = tmp_path / "hf" / "models--test-org--tiny-hf" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    return store


@contextlib.contextmanager
def _serve(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with HubServer(fake) as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        yield running


# ---- rm --------------------------------------------------------------------------------------


def test_removable_accepts_only_listed_entries(filled: Path, tmp_path: Path) -> None:
    names = {row.name for row in local_models()}
    assert {f"{REPO}:tiny-Q8_0.gguf", "test-org/tiny-hf"} <= names
    assert removable(f"{REPO}:tiny-Q8_0.gguf") == [filled / "test-org" / "tiny-GGUF" / "tiny-Q8_0.gguf"]
    assert removable("test-org/tiny-hf") == [tmp_path / "hf" / "models--test-org--tiny-hf"]
    outside = tmp_path / "mine.gguf"
    outside.write_bytes(b"GGUF")
    refused = {
        "store root": filled,
        "owner folder": filled / "test-org",
        "repo folder": filled / "test-org" / "tiny-GGUF",
        "HF cache root": tmp_path / "hf",
        "HF repo folder": tmp_path / "hf" / "models--test-org--tiny-hf",
        "file outside": outside,
    }
    for what, path in refused.items():
        with pytest.raises(UserError, match="not a model that `localrun models list` shows") as err:
            removable(str(path))
        assert "\n" not in str(err.value), what
    with pytest.raises(UserError, match="outside the model store"):
        removable(catalog.DEFAULT_MODEL_NAME)
    with pytest.raises(UserError, match="No downloaded model"):
        removable("test-org/nothing-here")


def test_cli_rm_of_the_store_root_exits_2(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "rm", str(filled), "-y"]) == 2
    assert "rm deletes only those" in capsys.readouterr().err
    assert (filled / "test-org" / "tiny-GGUF" / "tiny-Q8_0.gguf").is_file()


def test_rm_confirmation_at_eof_deletes_nothing(
    filled: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["models", "rm", f"{REPO}:tiny-Q8_0.gguf"]) == 1
    assert "Nothing deleted." in capsys.readouterr().out
    assert (filled / "test-org" / "tiny-GGUF" / "tiny-Q8_0.gguf").is_file()


# ---- pulls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../evil.gguf", "/abs/evil.gguf", "..\\evil.gguf", "sub/../../evil.gguf"])
def test_hostile_hub_names_are_refused_before_any_write(
    store: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    fake = FakeHub()
    fake.add("test-org/evil-GGUF", name, tiny)
    with _serve(fake, monkeypatch) as running:
        for spec in (f"test-org/evil-GGUF:{name}", "test-org/evil-GGUF"):
            with pytest.raises(UserError, match="Refusing the hub file name") as err:
                hub.pull(spec)
            assert "\n" not in str(err.value) and "resume" not in str(err.value)
        from ui import store as ui_store

        with pytest.raises(UserError, match="Refusing the hub file name"):
            ui_store.start_download(f"test-org/evil-GGUF:{name}")
        assert not any(m == "GET" and "/resolve/" in p for m, p, _ in running.requests)
    assert not list(tmp_path.rglob("evil.gguf*")) and not Path("/abs/evil.gguf").exists()
    assert not store.exists()  # nothing was created


def test_a_file_in_a_repo_subfolder_lands_where_list_shows_it(
    store: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeHub()
    fake.add("test-org/sub-GGUF", "sub/dir/model.gguf", tiny)
    with _serve(fake, monkeypatch):
        path = hub.pull("test-org/sub-GGUF:sub/dir/model.gguf")
    assert path == store / "test-org" / "sub-GGUF" / "sub" / "dir" / "model.gguf"
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "sub-GGUF" in line)
    assert row.split()[0] == "test-org/sub-GGUF:sub/dir/model.gguf" and row.endswith(str(path))
    for spec in ("test-org/sub-GGUF:sub/dir/model.gguf", "test-org/sub-GGUF"):
        assert resolve_model(spec).path == path
    assert main(["models", "rm", "-y", "test-org/sub-GGUF:sub/dir/model.gguf"]) == 0
    assert not path.exists() and not path.with_name("model.gguf.lock").exists()


def test_two_concurrent_pulls_end_with_one_correct_file(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeHub()
    source = default_model_path()  # ~100 MB: the second pull starts while the first is still downloading
    fake.add("test-org/big-GGUF", "model-Q4_1.gguf", source)
    results: list[Path | BaseException] = []

    def pull() -> None:
        try:
            results.append(hub.pull("test-org/big-GGUF:Q4_1"))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    with _serve(fake, monkeypatch) as running:
        threads = [threading.Thread(target=pull) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        gets = [p for m, p, _ in running.requests if m == "GET" and "/resolve/" in p]
    assert len(results) == 2 and results[0] == results[1], results
    dest = results[0]
    assert isinstance(dest, Path) and dest.is_file()
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert len(gets) == 1, "the second pull waited for the first, then found the file complete"
    assert "Another pull of model-Q4_1.gguf is running" in capsys.readouterr().err
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        "model-Q4_1.gguf",
        "model-Q4_1.gguf.localrun.json",
        "model-Q4_1.gguf.lock",
    ]


def test_a_corrupt_download_is_inspected_and_removed(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.gguf"
    gguf_corpus.cases()["nan-context-length"](bad)
    fake = FakeHub()
    fake.add("test-org/bad-GGUF", "bad-Q8_0.gguf", bad)  # listed with its true sha256: only validation catches it
    with _serve(fake, monkeypatch):
        with pytest.raises(UserError, match=r"not a usable GGUF file, so it was removed \(.*not a finite number"):
            hub.pull("test-org/bad-GGUF:Q8_0")
    folder = store / "test-org" / "bad-GGUF"
    assert [p.name for p in folder.iterdir()] == ["bad-Q8_0.gguf.lock"]


# ---- what a UI on the network may open ---------------------------------------------------------


def test_allowed_spec_off_loopback(filled: Path, tmp_path: Path) -> None:
    listed = [row for row in local_models() if row.name.startswith(REPO)][0]
    catalog_names = (catalog.DEFAULT_MODEL_NAME, "qwen2.5-0.5b-instruct", "qwen2.5-0.5b-instruct:Q8_0")
    for spec in (None, "", *catalog_names, listed.name, str(listed.path), "test-org/tiny-hf"):
        allowed_spec(spec, loopback=False)
    stray = tmp_path / "stray.gguf"
    shutil.copyfile(listed.path, stray)
    for spec in ("/etc/passwd", str(stray), str(filled), "../../secret.gguf"):
        with pytest.raises(UserError, match="over the network the UI opens only those"):
            allowed_spec(spec, loopback=False)
        allowed_spec(spec, loopback=True)  # on loopback the browser is the user's own


def test_ui_tables_show_store_relative_paths(filled: Path, tmp_path: Path) -> None:
    from ui import store as ui_store
    from ui.tabs.models import info_table

    table = ui_store.local_table()
    paths = [row[5] for row in table]
    assert "store/test-org/tiny-GGUF/tiny-Q8_0.gguf" in paths
    assert not any(str(tmp_path) in p or p.startswith("/") for p in paths), paths
    _, status = info_table("/etc/hostname", loopback=False)
    assert status.startswith("⚠️") and "opens only those" in status
    frame, status = info_table(f"{REPO}:tiny-Q8_0.gguf", loopback=False)
    assert status.startswith("Info for") and dict(frame.values.tolist())["architecture"] == "llama"


def test_ui_delete_takes_names_not_paths(filled: Path) -> None:
    from ui import store as ui_store

    stored = filled / "test-org" / "tiny-GGUF" / "tiny-Q8_0.gguf"
    for spec in (str(stored), str(filled), str(filled / "test-org")):
        with pytest.raises(UserError, match="No downloaded model"):
            ui_store.delete_model(spec)
    assert stored.is_file()
    assert ui_store.delete_model(f"{REPO}:tiny-Q8_0.gguf") == [stored]
    assert not stored.exists()

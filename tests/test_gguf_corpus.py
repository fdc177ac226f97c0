"""Every file of the corrupt-GGUF corpus (tests/gguf_corpus.py) is refused with one sentence: by inspect_gguf, by
`localrun chat` and `localrun models info` (exit 2, no traceback), and listed as corrupt by `models list`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf_corpus
import pytest

from localrun.cli import main
from localrun.errors import UserError
from localrun.models.gguf_info import inspect_gguf

ROOT = Path(__file__).resolve().parents[1]
CASES = sorted(gguf_corpus.cases())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = gguf_corpus.write_corpus(tmp_path_factory.mktemp("corpus"))
    return {p.stem: p for p in paths}


def _one_sentence(text: str) -> None:
    text = text.removesuffix("\n")
    assert "\n" not in text and "Traceback" not in text
    assert text.rstrip().endswith(".")


def test_corpus_covers_every_class() -> None:
    # The classes the validator must refuse; each needs at least one case.
    classes = "nan block-name nested overlapping misaligned five-dimensions unknown-ggml row-not-block overflow"
    for needle in (*classes.split(), "layers", "truncated", "flip", "huge"):
        assert any(needle in name for name in CASES), needle


@pytest.mark.parametrize("name", CASES)
def test_inspect_refuses_with_one_sentence(corpus: dict[str, Path], name: str) -> None:
    with pytest.raises(UserError) as err:
        inspect_gguf(corpus[name])
    _one_sentence(str(err.value))
    assert str(corpus[name]) in str(err.value)


@pytest.mark.parametrize("name", CASES)
def test_chat_and_info_exit_2(corpus: dict[str, Path], name: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["models", "info", str(corpus[name])], ["chat", str(corpus[name]), "-p", "hi", "--no-stats"]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("localrun: ")
        _one_sentence(captured.err)


@pytest.mark.parametrize("name", ["nan-context-length", "real-huge-block-count", "five-dimensions"])
def test_hf_backend_inspects_a_gguf_first(
    corpus: dict[str, Path], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chat", str(corpus[name]), "--backend", "hf", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    _one_sentence(err)
    assert "is truncated or corrupt" in err


def test_processes_exit_2_without_traceback(corpus: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("nan-context-length", "nested-arrays-3", "block-name-x", "real-huge-block-count"):
        for argv in (["chat", str(corpus[name]), "-p", "hi"], ["models", "info", str(corpus[name])]):
            done = subprocess.run(
                [sys.executable, "-m", "localrun.cli", *argv], capture_output=True, text=True, env=env, timeout=120
            )
            assert done.returncode == 2, (argv, done.stderr)
            _one_sentence(done.stderr)


@pytest.fixture()
def store_with_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    gguf_corpus.write_corpus(tmp_path / "home" / "models" / "corpus" / "bad")
    return tmp_path / "home" / "models"


def test_models_list_marks_each_corrupt_file(store_with_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in CASES:
        rows = [line for line in out.splitlines() if line.startswith(f"corpus/bad:{name}.gguf ")]
        assert len(rows) == 1, name
        assert rows[0].split()[2] == "corrupt", rows[0]
    assert "SmolLM2-135M-Instruct" in out  # the good rows are still there


def test_rm_and_ui_helpers_survive_a_corrupt_store(store_with_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ui import store as ui_store

    choices = ui_store.model_choices()
    assert len(choices) == len(CASES) + 1
    assert sum(1 for row in ui_store.local_table() if row[2] == "corrupt") == len(CASES)
    assert main(["models", "rm", "corpus/bad:nan-context-length.gguf", "-y"]) == 0
    assert not (store_with_corpus / "corpus" / "bad" / "nan-context-length.gguf").exists()
    assert "deleted" in capsys.readouterr().out


def test_ui_starts_with_a_corrupt_store(tmp_path: Path) -> None:
    gradio_client = pytest.importorskip("gradio_client")
    from test_ui_api import rows, run_ui

    gguf_corpus.write_corpus(tmp_path / "home" / "models" / "corpus" / "bad")
    with run_ui(tmp_path) as url:
        client = gradio_client.Client(url, verbose=False)
        local, _ = client.predict(api_name="/local_models")
        quants = {row[0]: row[2] for row in rows(local)}
        assert all(quants[f"corpus/bad:{name}.gguf"] == "corrupt" for name in CASES)
        status, _, _ = client.predict(spec="corpus/bad:block-name-x.gguf", confirm=True, api_name="/delete_model")
        assert status.startswith("Deleted"), status


def test_random_damage_gives_an_answer_or_one_sentence(tmp_path: Path) -> None:
    # Seeded bit flips, overwrites and cuts of a small valid file: inspect_gguf is total.
    import random

    rng = random.Random(10)
    tokens = (gguf_corpus.ARR, (gguf_corpus.STR, [f"t{i}" for i in range(100)]))
    nested = (gguf_corpus.ARR, (gguf_corpus.ARR, [(gguf_corpus.U32, [1, 2])]))
    base = gguf_corpus.build(
        gguf_corpus.tiny_kvs(**{"tokenizer.ggml.tokens": tokens, "x.nested": nested}), gguf_corpus.tiny_tensors()
    )
    outcomes = {"accepted": 0, "refused": 0}
    path = tmp_path / "damaged.gguf"
    for _ in range(300):
        data = bytearray(base)
        if rng.random() < 0.7:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(4, len(data))] ^= 1 << rng.randrange(8)
        else:
            data = data[: rng.randrange(4, len(data))]
        path.write_bytes(bytes(data))
        try:
            inspect_gguf(path)
            outcomes["accepted"] += 1
        except UserError as exc:
            _one_sentence(str(exc))
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and outcomes["accepted"] > 0, outcomes

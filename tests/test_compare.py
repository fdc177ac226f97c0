"""`localrun compare`: variants built and cached, rows streamed as they finish, outputs complete, failures isolated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_evaluate import SHORT, tiny_hf  # noqa: F401  (the shared tiny-model fixture)

from localrun.errors import UserError
from localrun.evaluate.compare import ROW_FIELDS, CompareEvent, CompareRequest, run_compare
from localrun.evaluate.report import pareto_front, write_outputs
from tests.serve_support import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEAD = f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Path) -> Path:  # noqa: F811
    """A private copy, so this module's cache dir name is its own."""
    dest = tmp_path_factory.mktemp("cmp") / "tinycmp"
    shutil.copytree(tiny_hf, dest)
    return dest


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(SHORT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def events(model_dir: Path, text_file: Path) -> list[CompareEvent]:
    cache = model_dir.parent / "cache"
    cache.mkdir()
    (cache / "tinycmp-Q4_0.gguf").write_bytes(b"GGUF" + b"\x00" * 64)  # a broken cached variant: fails to load
    # a dangling link where INT8 goes: its build runs, then cannot rename its output into place
    (cache / "tinycmp-int8").symlink_to(cache / "nowhere")
    req = CompareRequest(
        model=str(model_dir),
        quants=("F16", "Q8_0", "Q4_0", "Q4_1"),
        nf4=True,
        int8=True,
        prompt="Say hello.",
        text_path=str(text_file),
        n_ctx=32,
        max_tokens=6,
        cache_dir=str(cache),
        remotes=(DEAD,),  # a remote engine that is not there: an error row after the local ones
    )
    return list(run_compare(req))


def _rows(events: list[CompareEvent]) -> dict:
    return {e.label: e.row for e in events if e.stage == "row"}


def test_every_variant_gives_a_row_and_a_broken_one_an_error(events: list[CompareEvent]) -> None:
    rows = _rows(events)
    assert list(rows) == ["F16", "Q8_0", "Q4_0", "Q4_1", "NF4", "INT8", DEAD]
    assert rows[DEAD].kind == "remote" and "Nothing answers at" in rows[DEAD].error and not rows[DEAD].is_reference
    assert rows["Q4_0"].error and "Q4_1" in rows and rows["Q4_1"].error is None  # the next one still ran
    assert "Not a directory" in rows["INT8"].error and rows["INT8"].ppl is None  # its build failed
    assert [e.label for e in events if e.stage == "build"].count("INT8") >= 1
    for label in ("F16", "Q8_0", "Q4_1", "NF4"):
        row = rows[label]
        assert row.error is None, row.error
        assert row.size_bytes > 0 and row.ppl and row.ppl > 1 and row.load_s is not None
        assert row.decode_tps and row.ttft_s and row.peak_ram_bytes and row.answer
    assert rows["F16"].is_reference and rows["F16"].kld_mean == pytest.approx(0.0, abs=1e-6)
    assert rows["F16"].top1_agreement_pct == 100.0
    assert rows["Q8_0"].kld_mean < rows["Q4_1"].kld_mean  # more bits, closer to the reference
    assert rows["Q8_0"].bits_per_weight > rows["Q4_1"].bits_per_weight
    # a random tiny model has flat distributions: agreement far above chance (1 in 49152) is what NF4 keeps
    assert rows["NF4"].kind == "hf" and 0 < rows["NF4"].kld_mean < 1.0 and rows["NF4"].top1_agreement_pct > 10


def test_rows_stream_as_each_variant_finishes(events: list[CompareEvent]) -> None:
    stages = [(e.stage, e.label) for e in events]
    assert stages.index(("row", "F16")) < stages.index(("run", "Q8_0"))
    tokens = [e for e in events if e.stage == "token" and e.label == "Q8_0"]
    assert len(tokens) >= 2 and "".join(e.text for e in tokens).strip()


def test_cached_variants_are_reused(model_dir: Path, text_file: Path, events: list[CompareEvent]) -> None:
    """A second run builds nothing and loads every variant from the store, the saved NF4 directory included:
    with the source's weights moved away, anything quantized from the source would fail."""
    cache = model_dir.parent / "cache"
    before = {p.name: p.lstat().st_mtime_ns for p in cache.iterdir()}
    req = CompareRequest(
        model=str(model_dir),
        quants=("Q8_0",),
        nf4=True,
        text_path=str(text_file),
        n_ctx=32,
        max_tokens=2,
        cache_dir=str(cache),
    )
    weights = model_dir / "model.safetensors"
    weights.rename(weights.with_suffix(".away"))
    try:
        again = list(run_compare(req))
    finally:
        weights.with_suffix(".away").rename(weights)
    assert not [e for e in again if e.stage in ("build", "reference")]
    assert {p.name: p.lstat().st_mtime_ns for p in cache.iterdir()} == before
    rows, first = _rows(again), _rows(events)
    assert list(rows) == ["F16", "Q8_0", "NF4"] and all(r.error is None for r in rows.values()), rows
    assert rows["NF4"].path == str(cache / "tinycmp-nf4") and rows["NF4"].answer
    for label in ("Q8_0", "NF4"):
        assert rows[label].kld_mean == pytest.approx(first[label].kld_mean, rel=1e-6)


def test_outputs_have_every_field_and_valid_charts(events: list[CompareEvent], tmp_path: Path) -> None:
    from dataclasses import replace

    rows = list(_rows(events).values())
    # a remote engine that answered: speed and memory, but no size to place it on a size chart
    answered = replace(rows[-1], label="box", error=None, ttft_s=0.1, decode_tps=50.0, kld_mean=None)
    rows.append(answered)
    files = write_outputs(tmp_path, rows, {"model": "tiny"})
    data = json.loads(files["json"].read_text())
    assert data["meta"] == {"model": "tiny"} and len(data["rows"]) == 8
    for row in data["rows"]:
        assert set(row) == set(ROW_FIELDS)
    header = files["csv"].read_text().splitlines()[0].split(",")
    assert header == list(ROW_FIELDS)
    for name in ("quality_chart", "speed_chart"):
        import matplotlib.image

        blob = files[name].read_bytes()
        assert blob.startswith(PNG_MAGIC)
        assert matplotlib.image.imread(files[name]).shape[0] > 100
    front = pareto_front(rows)
    assert front and front[0].size_bytes == min(r.size_bytes for r in front)
    assert answered not in pareto_front(rows, "decode_tps")


def test_what_cannot_be_compared_is_one_sentence(model_dir: Path) -> None:
    for req, says in [
        (CompareRequest(model=DEAD, quants=("Q8_0",)), "is a remote engine: levels are built from a model on disk"),
        (CompareRequest(model=str(model_dir), quants=()), "Quality is measured against the F16 reference"),
    ]:
        with pytest.raises(UserError, match=says):
            list(run_compare(req))


def test_cli_prints_rows_and_writes_outputs(cli, model_dir: Path, text_file: Path, tmp_path: Path, events) -> None:  # type: ignore[no-untyped-def]
    cache = model_dir.parent / "cache"
    out = tmp_path / "out"
    args = ["compare", str(model_dir), "--quants", "Q8_0", "--text", str(text_file), "--ctx", "32"]
    result = cli(*args, "--max-tokens", "2", "--cache-dir", str(cache), "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("variant") and lines[1].startswith("F16") and lines[2].startswith("Q8_0")
    assert (out / "compare.json").is_file() and (out / "quality_vs_size.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_bad_input_is_one_sentence(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("compare", "default", "--quants", "Q9_9")
    assert result.returncode == 2 and "Unknown quantization type" in result.stderr
    assert "Traceback" not in result.stderr

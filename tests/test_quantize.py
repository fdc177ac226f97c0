"""GGUF quantization: every offered type loads and generates, sizes follow bits, outputs are atomic and honest."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import psutil
import pytest
from conftest import cached_build

from localrun.errors import UserError
from localrun.models.catalog import default_model_path
from localrun.quantize import QuantResult, run_quantize
from localrun.quantize.gguf_quant import iter_quantize, quant_types
from localrun.quantize.to_gguf import convert_hf_to_gguf, gguf_to_hf_dir, restore_pre_tokenizer

SLOW_TYPES = {"IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S"}  # ~40 s each on SmolLM2 with 2 cores
FLOATS = {"F32", "F16", "BF16"}  # tested by test_to_gguf


@pytest.fixture(scope="session")
def smollm2_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M dequantised to HF safetensors, then converted by our converter to F16 (shared by name)."""
    hf = cached_build(tmp_path_factory, "smollm2-hf", lambda p: gguf_to_hf_dir(default_model_path(), p))
    return cached_build(tmp_path_factory, "smollm2-F16.gguf", lambda p: convert_hf_to_gguf(hf, p, out_type="F16"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 256-wide llama (K-quant friendly widths) with SmolLM2's tokenizer."""
    from test_to_gguf import build_tiny_model

    def build(path: Path) -> None:
        from transformers import AutoTokenizer

        gguf = default_model_path()
        tok = path.parent / "tiny256-tok"
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tok)
        restore_pre_tokenizer(tok, "smollm")
        build_tiny_model("mistral", tok, path, hidden=256, tied=True)

    return cached_build(tmp_path_factory, "tiny256-hf", build)


def _run(src: Path | str | None, targets: list[str], out_dir: Path, **kw) -> tuple[dict[str, QuantResult], list]:  # type: ignore[no-untyped-def]
    events = list(run_quantize(src, targets, out_dir=out_dir, **kw))
    results = {e.target: e.result for e in events if e.stage == "done" and e.result is not None}
    return results, events


def _smol_targets() -> list[str]:
    targets = [t for t in quant_types() if t not in SLOW_TYPES and t not in FLOATS]
    return targets + (sorted(SLOW_TYPES) if os.environ.get("LOCALRUN_TEST_ALL_QUANTS") else [])


@pytest.fixture(scope="module")
def smol_quants(tmp_path_factory: pytest.TempPathFactory, smollm2_f16: Path) -> dict[str, QuantResult]:
    results, _ = _run(smollm2_f16, _smol_targets(), tmp_path_factory.mktemp("smol-quants"))
    return results


def _generates(path: Path) -> str:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
    llm.close()
    return out["choices"][0]["text"]


def _reader_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_every_type_loads_and_generates(smol_quants: dict[str, QuantResult]) -> None:
    assert smol_quants and sorted(smol_quants) == sorted(_smol_targets())  # one result per type asked for
    for target, result in smol_quants.items():
        assert result.path.is_file() and result.path.name.endswith(f"-{target}.gguf")
        assert _generates(result.path).strip(), f"{target} generated nothing"
        print(
            f"{target:7} {result.size_bytes / 2**20:7.1f} MiB {result.bits_per_weight:6.2f} bpw {result.tensor_types}"
        )


def test_sizes_fall_with_bits(smol_quants: dict[str, QuantResult]) -> None:
    size = {t: r.size_bytes for t, r in smol_quants.items()}
    chains = [
        ["Q8_0", "Q6_K", "Q5_K_S", "Q4_K_S", "Q3_K_S"],
        ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"],
        ["Q5_K_M", "Q5_K_S"],
        ["Q4_K_M", "Q4_K_S"],
        ["Q3_K_L", "Q3_K_M", "Q3_K_S"],
    ]
    for chain in chains:
        sizes = [size[t] for t in chain]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), chain
    assert size["Q2_K"] <= size["Q3_K_S"]


def test_histogram_and_fallbacks_are_what_the_file_holds(smol_quants: dict[str, QuantResult]) -> None:
    result = smol_quants["Q4_K_M"]
    types = _reader_types(result.path)
    hist: dict[str, int] = {}
    for name in types.values():
        hist[name] = hist.get(name, 0) + 1
    assert hist == result.tensor_types
    # SmolLM2's 576-wide rows cannot hold 256-element K blocks: those tensors fell back, and we say which
    assert len(result.fallbacks) > 100
    for line in result.fallbacks:
        name, change = line.split(": ", 1)
        assert "576 columns" in line
        assert types[name].lower() == change.split(" -> ")[1].split()[0].lower()
    assert types["blk.0.ffn_down.weight"] in {"Q4_K", "Q6_K"}  # 1536 columns: a real K-quant


def test_k_and_iq_types_on_k_friendly_widths(tmp_path: Path, tiny_hf: Path) -> None:
    targets = ["F16", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", *sorted(SLOW_TYPES)]
    results, events = _run(tiny_hf, targets, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"tiny256-hf-{t}.gguf" for t in targets)
    assert sum(1 for e in events if e.stage == "convert" and e.fraction == 0.0) == 1  # one conversion
    for target, result in results.items():
        assert not result.fallbacks, target
        assert _generates(result.path), target
    chain = ["F16", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    sizes = [results[t].size_bytes for t in chain]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert results["IQ4_XS"].tensor_types.get("IQ4_XS", 0) > 0
    assert results["IQ3_S"].tensor_types.get("IQ3_S", 0) > 0
    fractions = [e.fraction for e in events if e.stage == "quantize" and e.target == "Q4_K_M"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 10


def test_hf_source_without_f16_target_uses_a_temp(tmp_path: Path, tiny_hf: Path) -> None:
    results, events = _run(tiny_hf, ["q8_0"], tmp_path)
    assert sum(1 for e in events if e.stage == "convert" and e.fraction == 0.0) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["tiny256-hf-Q8_0.gguf"]  # the F16 temp is gone
    assert results["Q8_0"].tensor_types["Q8_0"] > 0


def test_requantize_needs_permission(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--allow-requantize"):
        _run(None, ["Q8_0"], tmp_path)
    assert not list(tmp_path.iterdir())
    results, events = _run("default", ["Q4_0"], tmp_path, allow_requantize=True)
    warnings = [e.message for e in events if e.stage == "warning"]
    assert warnings and "Q4_1" in warnings[0]
    assert results["Q4_0"].path.name == "SmolLM2-135M-Instruct-Q4_0.gguf"


def _only_children_of_test() -> set[int]:
    """Live child processes of the test process (other tests may leave long-lived ones, e.g. the
    multiprocessing resource tracker, so callers compare against the set before they start)."""
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"}


@pytest.mark.parametrize("how", ["interrupt", "abandon"])
def test_ctrl_c_leaves_nothing(tmp_path: Path, smollm2_f16: Path, how: str) -> None:
    source_stat = smollm2_f16.stat()
    before = _only_children_of_test()
    gen = iter_quantize(smollm2_f16, tmp_path / "out-Q4_K_M.gguf", "Q4_K_M")
    for event in gen:
        if event.stage == "quantize" and event.fraction > 0.05:
            break
    assert list(tmp_path.iterdir())  # the temporary exists mid-run
    if how == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            gen.throw(KeyboardInterrupt)
    else:
        gen.close()
    assert not list(tmp_path.iterdir())
    assert not _only_children_of_test() - before  # the quantizer process is gone
    assert smollm2_f16.stat().st_mtime_ns == source_stat.st_mtime_ns


def test_errors(tmp_path: Path, smollm2_f16: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="valid types are .*Q8_0.*Q4_K_M"):
        _run(smollm2_f16, ["Q4_K_X"], tmp_path)
    with pytest.raises(UserError, match="does not exist|Unknown model"):
        _run(tmp_path / "missing.gguf", ["Q8_0"], tmp_path)
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: free._replace(free=10 << 20))
    with pytest.raises(UserError, match="Not enough disk space"):
        _run(smollm2_f16, ["Q8_0"], tmp_path)
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path: Path, tiny_hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localrun.cli import quantize as cli_quantize

    parser = argparse.ArgumentParser()
    cli_quantize.register(parser.add_subparsers())
    args = parser.parse_args(["quantize", str(tiny_hf), "--to", "F16", "--to", "Q4_K_M", "-o", str(tmp_path)])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "Q4_K_M" in out and "bits/weight" in out and "tensor types:" in out
    # stderr is not a terminal here: plain progress lines, no carriage returns or escape codes
    assert "\r" not in err and "\033" not in err
    progress = [line for line in err.splitlines() if line.startswith("[Q4_K_M quantize")]
    assert 3 <= len(progress) <= 12, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny256-hf-F16.gguf", "tiny256-hf-Q4_K_M.gguf"]
    assert cli_quantize.main([str(tiny_hf), "--to", "Q7_X", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unknown quantization type" in err


def test_quantizer_failure_is_one_sentence(tmp_path: Path) -> None:
    from test_gguf_info import write_tiny_gguf

    # a llama GGUF without its hyperparameters: llama.cpp's quantizer refuses it
    broken = write_tiny_gguf(tmp_path / "broken-F32.gguf", arch="llama")
    with pytest.raises(UserError) as caught:
        _run(broken, ["Q8_0"], tmp_path / "out")
    message = str(caught.value)
    assert message.startswith("llama.cpp could not quantize broken-F32.gguf to Q8_0 (") and "\n" not in message
    assert not list((tmp_path / "out").iterdir())

"""Settings describe themselves: one field definition reaches the CLI flags, the REPL's /set, the UI controls
and the catalog's checks."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from conftest import cached_build

from localrun.errors import UserError
from localrun.models.catalog import Recommended
from localrun.records import RecordError, build, setting
from localrun.settings import (
    DEFAULT_CTX_CAP,
    Meta,
    SamplingParams,
    add_flags,
    effective_n_ctx,
    from_args,
    recommendable,
    set_value,
)


class WithTypicalP(SamplingParams):
    """A sampling setting added the way the next ones will be: one field."""

    typical_p: float = setting(
        1.0,
        gt=0.0,
        le=1.0,
        help="Locally typical sampling (1 = off).",
        meta=Meta("Typical-p", "sampling", slider=(0.0, 1.0, 0.01), recommend=True),
    )


def test_a_new_field_reaches_the_cli_flags() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, WithTypicalP)
    assert "--typical-p" in parser.format_help() and "Locally typical sampling" in parser.format_help()
    params = from_args(WithTypicalP, parser.parse_args(["--typical-p", "0.5", "--temperature", "0"]))
    assert params.typical_p == 0.5 and params.temperature == 0
    with pytest.raises(UserError, match="Invalid typical_p"):
        from_args(WithTypicalP, parser.parse_args(["--typical-p", "2"]))


def test_a_new_field_reaches_set() -> None:
    params = set_value(WithTypicalP(), "typical_p", " 0.25 ")
    assert params.typical_p == 0.25 and isinstance(params, WithTypicalP)
    with pytest.raises(UserError, match="Invalid typical_p: Input should be a valid number"):
        set_value(params, "typical_p", "lots")
    with pytest.raises(UserError, match="with NAME one of .*typical_p"):
        set_value(params, "typicalp", "0.3")


def test_a_new_field_reaches_the_ui_controls() -> None:
    pytest.importorskip("gradio")
    from ui.controls import make_control, recommended_values, rows, sampling_params

    assert "typical_p" in rows(WithTypicalP)[0]  # the sampling row
    control = make_control(WithTypicalP, "typical_p")
    assert type(control).__name__ == "Slider" and control.label == "Typical-p" and control.maximum == 1.0
    assert control.elem_id == "set-typical_p" and "Locally typical" in control.info
    assert sampling_params({"typical_p": 0.4, "stop": ""}, WithTypicalP).typical_p == 0.4
    assert "typical_p" in recommendable(WithTypicalP)
    assert recommended_values(None, WithTypicalP)[1]["typical_p"] == 1.0


def test_set_parses_every_kind_of_field() -> None:
    params = SamplingParams()
    assert set_value(params, "max_tokens", "12").max_tokens == 12
    assert set_value(params, "ignore_eos", "yes").ignore_eos is True
    assert set_value(set_value(params, "seed", "7"), "seed", "none").seed is None
    assert set_value(params, "stop", "###").stop == ("###",)
    with pytest.raises(UserError, match="Invalid max_tokens"):
        set_value(params, "max_tokens", "0")


def test_manifests_may_recommend_only_what_meta_allows_and_only_valid_values() -> None:
    penalties = {"presence_penalty", "frequency_penalty", "dry_multiplier", "dry_base", "dry_allowed_length"}
    assert (
        set(recommendable())
        == {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "dry_penalty_last_n"} | penalties
    )
    assert build(Recommended, {"temperature": 0.2, "top_k": 20}).sampling() == {"temperature": 0.2, "top_k": 20}
    with pytest.raises(RecordError, match="max_tokens: Extra inputs are not permitted"):
        build(Recommended, {"max_tokens": 10})  # not recommendable: a typo-proof manifest refuses it
    with pytest.raises(RecordError, match="temperature: Input should be less than or equal to 5"):
        build(Recommended, {"temperature": 9.0})  # outside SamplingParams' range


def test_one_context_rule() -> None:
    assert effective_n_ctx(None, 32768) == DEFAULT_CTX_CAP
    assert effective_n_ctx(None, 2048) == 2048
    assert effective_n_ctx(None, None) == DEFAULT_CTX_CAP
    assert effective_n_ctx(4096, 32768) == 4096 and effective_n_ctx(20000, 2048) == 20000


@pytest.fixture(scope="module")
def long_context_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama trained (nominally) for 32768 tokens, converted by our own HF -> GGUF converter."""
    from test_to_gguf import build_tiny_model

    from localrun.models.catalog import default_model_path
    from localrun.quantize.to_gguf import convert_hf_to_gguf, restore_pre_tokenizer

    def build(path: Path) -> None:
        from transformers import AutoTokenizer

        work = tmp_path_factory.mktemp("long-ctx")
        gguf = default_model_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(work / "tok")
        restore_pre_tokenizer(work / "tok", "smollm")
        hf_dir = build_tiny_model("mistral", work / "tok", work / "hf")
        config = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}))
        convert_hf_to_gguf(hf_dir, path, out_type="F16")

    return cached_build(tmp_path_factory, "tiny-32k.gguf", build)


def test_models_fit_reports_the_context_chat_loads(long_context_gguf: Path, capsys) -> None:
    from localrun.cli import build_parser, main
    from localrun.cli import chat as cli_chat
    from localrun.models.catalog import resolve_model
    from localrun.models.gguf_info import inspect_gguf
    from localrun.settings import LoadOptions

    assert inspect_gguf(long_context_gguf).context_length == 32768
    assert main(["models", "fit", str(long_context_gguf)]) == 0
    fit_ctx = int(re.search(r"KV cache \((\d+) ctx", capsys.readouterr().out).group(1))
    args = build_parser().parse_args(["chat", str(long_context_gguf)])  # what `localrun chat MODEL` loads
    backend = cli_chat.load(resolve_model(args.model), from_args(LoadOptions, args))
    try:
        assert backend.report.n_ctx == fit_ctx  # both chose it from memory (engine.plan.choose_context)
    finally:
        backend.close()
    assert main(["models", "fit", str(long_context_gguf), "--n-ctx", "2048"]) == 0
    assert "KV cache (2048 ctx" in capsys.readouterr().out
    assert main(["models", "fit", str(long_context_gguf), "--ctx", "1024"]) == 0  # the old flag still works
    assert "KV cache (1024 ctx" in capsys.readouterr().out


def test_the_api_bounds_are_the_settings_bounds() -> None:
    # one declaration of each range: an API field named after a sampling setting takes that setting's bounds
    from localrun.records import fields
    from localrun.server.protocol import ChatBody, CompletionBody

    aliases = {"repetition_penalty": "repeat_penalty", "max_completion_tokens": "max_tokens"}
    setting_fields = fields(SamplingParams)
    checked = 0
    for body in (ChatBody, CompletionBody):
        for name, info in body.model_fields.items():
            field = setting_fields.get(aliases.get(name, name))
            if field is None:
                continue
            api = {kind: getattr(m, kind) for m in info.metadata for kind in ("ge", "gt", "le") if hasattr(m, kind)}
            want = {
                k: v
                for k, v in (("ge", field.check.ge), ("gt", field.check.gt), ("le", field.check.le))
                if v is not None
            }
            assert api == want, (body.__name__, name)
            checked += 1
    assert checked >= 2 * 12  # temperature, top_p, max_tokens, top_k, min_p, penalties, DRY ...

"""UI controls from the settings models, backend-specific visibility, and the live-metrics rendering."""

from __future__ import annotations

import re

import pytest

from localrun.engine.events import GenerationEvent, GenerationSummary
from localrun.errors import UserError
from localrun.records import fields
from localrun.settings import LoadOptions, SamplingParams, meta, ui_fields
from ui.controls import load_options, sampling_params, visible_fields
from ui.metrics import LiveSeries, charts_html, metrics_html, reply_footer, turn_row
from ui.tabs.chat import LOAD_ROWS, SAMPLING_ROWS


def test_every_field_has_a_place_a_label_and_a_description() -> None:
    assert sorted(sum(LOAD_ROWS, ())) == sorted(ui_fields(LoadOptions))
    assert sorted(sum(SAMPLING_ROWS, ())) == sorted(ui_fields(SamplingParams))
    assert "grammar" not in ui_fields(SamplingParams)  # the chat tab takes a JSON schema instead
    assert "trust_remote_code" not in ui_fields(LoadOptions) and "allow_pickle" not in ui_fields(LoadOptions)
    for model in (LoadOptions, SamplingParams):
        assert all(spec.check.help and meta(model, n).label != n for n, spec in fields(model).items())


def test_options_for_another_backend_are_hidden() -> None:
    assert meta(LoadOptions, "kv_type").backend == "llamacpp" and meta(LoadOptions, "static_cache").backend == "hf"
    assert meta(LoadOptions, "n_ctx").backend is None
    gguf = visible_fields("auto", "gguf")
    assert gguf["n_gpu_layers"] and gguf["kv_type"] and not gguf["quant"] and not gguf["attn"]
    hf = visible_fields("hf", "gguf")
    assert hf["quant"] and hf["static_cache"] and not hf["kv_type"] and hf["n_ctx"]
    assert all(visible_fields("auto", None).values())  # unknown model: show everything


def test_form_values_become_settings() -> None:
    options = load_options({"backend": "llamacpp", "n_ctx": "2048", "n_gpu_layers": "", "kv_type": "f16"})
    assert options.n_ctx == 2048 and options.n_gpu_layers is None and options.backend == "llamacpp"
    assert load_options({"n_gpu_layers": "0"}).n_gpu_layers == 0  # 0 means CPU, not "auto"
    params = sampling_params({"max_tokens": 16.0, "seed": "7", "stop": "###\nEND", "temperature": 0.2})
    assert params.max_tokens == 16 and params.seed == 7 and params.stop == ("###", "END")
    drafting = load_options({"draft": "", "lookup": True, "draft_max": 8.0, "draft_mode": "fixed"})
    assert drafting.draft is None and drafting.lookup and drafting.draft_max == 8 and drafting.draft_mode == "fixed"
    with pytest.raises(UserError, match="whole number"):
        load_options({"n_ctx": "lots"})
    with pytest.raises(UserError, match="n_ctx"):
        load_options({"n_ctx": "8"})


def test_the_draft_picker_lists_models_on_disk(default_gguf) -> None:
    from ui.controls import make_control

    picker = make_control(LoadOptions, "draft")
    values = [value for _, value in picker.choices]
    assert values[0] == "" and picker.value == "" and picker.elem_id == "set-draft"
    assert "smollm2-135m-instruct" in values  # the default model (as the chat's own picker names it)
    assert make_control(LoadOptions, "lookup").elem_id == "set-lookup"


def _event(**final) -> GenerationEvent:
    return GenerationEvent(
        text="x",
        token_ids=(1,),
        from_draft=(False,),
        prompt_tokens=12,
        generated_tokens=5,
        ttft_s=0.042,
        prompt_tps=300.0,
        decode_tps=95.5,
        elapsed_s=0.1,
        ram_bytes=300_000_000,
        peak_ram_bytes=310_000_000,
        vram_bytes=None,
        peak_vram_bytes=None,
        **final,
    )


def test_metrics_panel_carries_labels_and_raw_values() -> None:
    html = metrics_html(_event(), state="generating")
    assert re.search(r'id="m-ttft" data-value="0.042">42 ms<', html)
    assert re.search(r'id="m-decode-tps" data-value="95.5">96 tok/s<', html)
    assert 'id="m-ram" data-value="300000000">300 MB<' in html and "peak 310 MB" in html
    assert "no GPU" in html
    assert "data-value" not in metrics_html(None)
    assert "m-acceptance" not in html  # no draft, no acceptance card


def test_metrics_panel_and_turn_row_show_the_draft() -> None:
    import dataclasses

    html = metrics_html(dataclasses.replace(_event(), draft_tokens=244, accepted_tokens=212))
    assert re.search(r'id="m-acceptance" data-value="0.8689">87%<', html) and "212 of 244 drafted" in html
    summary = GenerationSummary(
        "length", 12, 12, 220, 0.04, None, 90.0, 2.5, 1, None, draft_tokens=244, accepted_tokens=212
    )
    assert turn_row(1, "m", summary)[-2] == "87% · 212 of 244"
    assert "draft accepted 212/244 (87%)" in reply_footer(summary)


def test_series_and_turn_rows() -> None:
    series = LiveSeries()
    series.add(_event())
    assert set(series.rate) == {"average"} and series.memory == {"RAM": [(0.1, 300.0)]}
    svg = charts_html(series)
    assert 'data-series="average"' in svg and 'data-series="RAM" data-points="1"' in svg
    assert 'id="chart-memory" data-top="500"' in svg  # the axis runs from 0 to a round number above 300 MB
    summary = GenerationSummary(
        finish_reason="cancelled",
        prompt_tokens=12,
        prefill_tokens=12,
        generated_tokens=5,
        ttft_s=0.042,
        prompt_tps=300.0,
        decode_tps=95.5,
        total_s=0.2,
        peak_ram_bytes=310_000_000,
        peak_vram_bytes=None,
    )
    # 12 evaluated prompt tokens are too few for a prompt rate (format.MIN_RATE_TOKENS)
    assert turn_row(3, "m", summary) == [3, "m", 42.0, None, 95.5, 5, 0, 310.0, None, None, "cancelled"]
    assert reply_footer(summary).endswith("· cancelled") and "TTFT 42 ms" in reply_footer(summary)


def test_metrics_panel_shows_a_cache_hit_without_a_rate() -> None:
    import dataclasses

    html = metrics_html(dataclasses.replace(_event(), prompt_tokens=81, prefill_tokens=1))
    assert re.search(r'id="m-prompt-tps">1 new token<', html) and "80 cached" in html  # no rate, no data-value
    html = metrics_html(dataclasses.replace(_event(), prompt_tokens=81, prefill_tokens=81))
    assert re.search(r'id="m-prompt-tps" data-value="300.0">300 tok/s<', html) and "81 tokens" in html


def test_models_info_and_the_models_tab_show_the_same_rows(capsys: pytest.CaptureFixture[str]) -> None:
    from localrun.cli import main
    from localrun.models.catalog import DEFAULT_MODEL_NAME
    from ui import store

    assert main(["models", "info", DEFAULT_MODEL_NAME]) == 0
    printed = [(line[:34].rstrip(), line[35:]) for line in capsys.readouterr().out.splitlines()]
    shown = [tuple(row) for row in store.model_info(DEFAULT_MODEL_NAME)]
    assert [k for k, _ in printed] == [k for k, _ in shown] and "fit verdict" in dict(shown)
    changing = {"free RAM / usable GPU"}  # free memory moves between the two reads
    assert [r for r in printed if r[0] not in changing] == [r for r in shown if r[0] not in changing]

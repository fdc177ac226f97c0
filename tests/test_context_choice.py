"""The context a load chooses from memory (engine.plan.choose_context), and the reason it gives: on a tiny random
llama trained for 32k, served with --memory-budget at three levels, loaded for real and measured."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO, cached_build
from tests.serve_support import start_server, stop

TRAINED = 32768
N_LAYERS, N_EMBD, N_HEAD, HEAD_DIM, N_FF, N_VOCAB = 8, 256, 4, 64, 512, 512


def write_long_llama(path: Path) -> Path:
    """A loadable llama GGUF: random F16 weights, a SentencePiece-style vocabulary of N_VOCAB tokens, and a
    trained context of 32768. Its f16 KV cache costs 8 KiB a token (256 MiB at 32k, 64 MiB at 8k)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(N_VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (N_VOCAB - 259)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("long-llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(TRAINED)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(N_VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(np.float16)

    writer.add_tensor("token_embd.weight", mat(N_VOCAB, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for il in range(N_LAYERS):
        p = f"blk.{il}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("q", "k", "v"):
            writer.add_tensor(p + f"attn_{name}.weight", mat(N_HEAD * HEAD_DIM, N_EMBD))
        writer.add_tensor(p + "attn_output.weight", mat(N_EMBD, N_HEAD * HEAD_DIM))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", mat(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_up.weight", mat(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_down.weight", mat(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def long_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_build(tmp_path_factory, "long-llama-32k.gguf", write_long_llama)


def _need(path: Path, n_ctx: int, slots: int = 1) -> int:
    """The fit estimate of the loaded process, computed here independently of the choice."""
    from localrun.models import fit
    from localrun.models.gguf_info import inspect_gguf

    return fit.worker_bytes(inspect_gguf(path), n_ctx=n_ctx, slots=slots, kv_type="f16")


def test_the_tiny_model_is_trained_for_32k_and_32k_costs_much_more_than_8k(long_gguf: Path) -> None:
    from localrun.models.gguf_info import inspect_gguf

    assert inspect_gguf(long_gguf).context_length == TRAINED
    assert _need(long_gguf, TRAINED) - _need(long_gguf, 8192) > 180 * 2**20  # 192 MiB more KV cache


# Budgets as shares of the memory the whole trained context needs: all of it fits, about half, about a third.
LEVELS = (1.15, 0.6, 0.4)


@pytest.mark.parametrize("share", LEVELS)
def test_served_with_a_memory_budget_the_context_is_the_largest_that_fits_and_rss_matches_the_plan(
    long_gguf: Path, share: float
) -> None:
    budget = int(_need(long_gguf, TRAINED) * share)
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_API_KEY"}
    proc, base = start_server(
        str(long_gguf), "--memory-budget", str(budget), "--parallel", "1", "--device", "cpu", env=env
    )  # on the CPU, RSS counts the KV cache
    try:
        row = next(r for r in httpx.get(f"{base}/v1/models", timeout=30).json()["data"] if r["loaded"])
        reply = httpx.post(
            f"{base}/v1/completions",
            json={"model": row["id"], "prompt": "hello there", "max_tokens": 4, "temperature": 0},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        row = next(r for r in httpx.get(f"{base}/v1/models", timeout=30).json()["data"] if r["loaded"])
        rss = psutil.Process(row["pid"]).memory_info().rss
    finally:
        stop(proc)
    n_ctx = row["context_length"]
    assert n_ctx % 256 == 0 and n_ctx <= TRAINED
    assert _need(long_gguf, n_ctx) <= budget, "the chosen context fits"
    if n_ctx < TRAINED:
        assert _need(long_gguf, n_ctx + 256) > budget, "and 256 more would not"
        assert row["context_reason"].startswith(f"context {n_ctx} (trained {TRAINED}; {TRAINED} would need")
    else:
        assert share > 1 and row["context_reason"].startswith(f"context {TRAINED} (the trained length; needs")
    assert "memory budget" in row["context_reason"]
    assert row["planned_bytes"] == _need(long_gguf, n_ctx)
    # loading at the chosen context holds what the plan said, within the fit bench's 10 %
    assert abs(row["planned_bytes"] - rss) <= 0.1 * rss, (n_ctx, row["planned_bytes"], rss)
    stderr = proc.stderr.read()
    assert f"localrun: {row['context_reason']}" in stderr  # serve's ready lines say it too
    print(f"budget {budget / 2**20:.0f} MiB: ctx {n_ctx}, planned {row['planned_bytes']}, rss {rss}")


def test_the_three_levels_choose_three_contexts(long_gguf: Path) -> None:
    from localrun.engine.messages import LoadRequest
    from localrun.engine.plan import plan_load
    from localrun.settings import LoadOptions

    chosen = []
    for share in LEVELS:
        budget = int(_need(long_gguf, TRAINED) * share)
        plan = plan_load(LoadRequest(str(long_gguf), LoadOptions(memory_budget_bytes=budget)))
        chosen.append(int(plan.how.split("ctx ")[1].split(",")[0]))
        assert plan.bytes <= budget
    assert chosen[0] == TRAINED and TRAINED > chosen[1] > chosen[2] >= 4096, chosen


def test_plan_and_backend_choose_the_same_and_the_pool_passes_its_budget(long_gguf: Path) -> None:
    from localrun.engine.messages import Loaded, LoadRequest
    from localrun.engine.plan import plan_load
    from localrun.engine.pool import ModelPool, PoolPolicy
    from localrun.settings import LoadOptions

    budget = int(_need(long_gguf, TRAINED) * 0.5)
    pool = ModelPool(PoolPolicy(budget_bytes=budget))
    try:
        load = LoadRequest(str(long_gguf), LoadOptions())
        first = [u for u in pool.submit(load) if isinstance(u, Loaded)][0]
        assert first.request.options.memory_budget_bytes == budget
        planned = plan_load(LoadRequest(str(long_gguf), LoadOptions(memory_budget_bytes=budget)))
        assert f"ctx {first.report.n_ctx}," in planned.how
        assert first.report.n_ctx < TRAINED and first.report.context_reason.startswith(f"context {first.report.n_ctx}")
        # the same load again, as a user sends it (no budget in it), is the model already loaded: no reload
        again = [u for u in pool.submit(load) if isinstance(u, Loaded)][0]
        assert again == first and pool.counts["load", "request"] == 1
    finally:
        pool.close()


def test_n_ctx_wins_and_says_so(long_gguf: Path) -> None:
    from localrun.backends import load_backend, resolve_for
    from localrun.settings import LoadOptions

    options = LoadOptions(n_ctx=4096, memory_budget_bytes=1)
    backend = load_backend(resolve_for(str(long_gguf), options), options)
    try:
        assert backend.report.n_ctx == 4096 and backend.report.context_reason == "context 4096 (--n-ctx)"
    finally:
        backend.close()


def test_auto_slots_come_after_the_context_from_what_is_left(long_gguf: Path) -> None:
    from localrun.engine.plan import gguf_context
    from localrun.models.gguf_info import inspect_gguf
    from localrun.settings import LoadOptions

    info = inspect_gguf(long_gguf)
    # room for the whole context twice, not four times: the context stays whole and the slots give way
    budget = (_need(long_gguf, TRAINED, 2) + _need(long_gguf, TRAINED, 3)) // 2
    choice = gguf_context(info, LoadOptions(parallel=0, memory_budget_bytes=budget))
    assert (choice.n_ctx, choice.slots) == (TRAINED, 2), choice
    assert "2 fit within" in choice.slots_why
    # asked-for slots all count in the choice of context
    fixed = gguf_context(info, LoadOptions(parallel=4, memory_budget_bytes=budget))
    assert fixed.slots == 4 and _need(long_gguf, fixed.n_ctx, 4) <= budget < _need(long_gguf, fixed.n_ctx + 256, 4)
    assert "for 4 slots" in fixed.reason


def test_over_budget_falls_back_and_says_why(long_gguf: Path) -> None:
    from localrun.engine.plan import OVER_BUDGET_CTX, gguf_context
    from localrun.models.gguf_info import inspect_gguf
    from localrun.settings import LoadOptions

    choice = gguf_context(inspect_gguf(long_gguf), LoadOptions(memory_budget_bytes=2**20))
    assert choice.n_ctx == OVER_BUDGET_CTX and "over a 1 MB memory budget" in choice.reason


def test_transformers_context_from_the_config() -> None:
    from localrun.engine.plan import hf_context
    from localrun.settings import DEFAULT_CTX_CAP, LoadOptions

    config = {"max_position_embeddings": 32768, "num_hidden_layers": 4, "num_attention_heads": 4}
    config |= {"num_key_value_heads": 2, "hidden_size": 256}
    options = LoadOptions(dtype="float16", memory_budget_bytes=100 * 2**20 + 4 * 2 * 64 * 2 * 2 * 10000)
    choice = hf_context(config, options, weights_bytes=100 * 2**20)  # 2 KiB of KV a token
    assert choice.n_ctx == 9984 and choice.reason.startswith("context 9984 (trained 32768;")
    bare = hf_context({"max_position_embeddings": 32768}, options, weights_bytes=0)
    assert bare.n_ctx == DEFAULT_CTX_CAP and "no layer and head sizes" in bare.reason


def test_the_repl_ready_line_and_stats_show_the_reason(long_gguf: Path) -> None:
    # stdin a terminal, so chat runs its REPL; stdout and stderr stay pipes to read
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localrun.cli", "chat", str(long_gguf), "--no-save", "--no-stats"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    os.close(slave)
    os.write(master, b"/stats\n/bye\n")
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        os.close(master)
    ready = next(line for line in err.splitlines() if line.startswith("Ready:"))
    # this machine's default budget holds the tiny model's whole trained context
    assert f"; context {TRAINED} (the trained length; needs" in ready and "of free memory" in ready
    assert f"context {TRAINED} (the trained length" in out


def test_the_ui_load_line_shows_the_reason(long_gguf: Path) -> None:
    from localrun.backends import load_backend, resolve_for
    from localrun.engine.messages import Loaded, LoadRequest
    from localrun.settings import LoadOptions
    from ui.tabs.chat import _loaded_text

    options = LoadOptions(memory_budget_bytes=int(_need(long_gguf, TRAINED) * 0.5))
    backend = load_backend(resolve_for(str(long_gguf), options), options)
    try:
        report = backend.report
    finally:
        backend.close()
    line = _loaded_text(Loaded(LoadRequest(str(long_gguf), options), "long-llama", report))
    assert line.startswith("**Loaded long-llama**") and line.endswith(f" · {report.context_reason}")
    assert f"context {report.n_ctx} (trained {TRAINED}; {TRAINED} would need" in line

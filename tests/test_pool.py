"""Several models at once (localrun.engine.pool) through real `localrun serve` processes: the default model and
its Q8_0 (made by our quantizer) in a store of their own, each loaded on request in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import cached_build, run_localrun
from tests.serve_support import start_server, stop

SLOTS = "2"
N_CTX = "1024"
DEFAULT = "smollm2-135m-instruct"
SECOND = "local/smol:smol-q8.gguf"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LOCALRUN_HOME whose store holds the default model's Q8_0."""
    from localrun.models.catalog import default_model_path
    from localrun.quantize.gguf_quant import quantize_gguf

    q8 = cached_build(
        tmp_path_factory,
        "smollm2-Q8_0.gguf",
        lambda p: quantize_gguf(default_model_path(), p, "Q8_0", allow_requantize=True),
    )
    root = tmp_path_factory.mktemp("pool-home")
    folder = root / "models" / "local" / "smol"
    folder.mkdir(parents=True)
    (folder / "smol-q8.gguf").symlink_to(q8)
    return root


@pytest.fixture(scope="module")
def plans(home: Path) -> dict:
    """What the pool plans for each model at this test's context and slots (the same function serve uses)."""
    from localrun.engine.messages import LoadRequest
    from localrun.engine.pool import plan_load
    from localrun.settings import LoadOptions

    options = LoadOptions(n_ctx=int(N_CTX), parallel=int(SLOTS))
    q8 = home / "models" / "local" / "smol" / "smol-q8.gguf"
    return {
        DEFAULT: plan_load(LoadRequest(None, options)),
        SECOND: plan_load(LoadRequest(str(q8), options)),
    }


def _serve(home: Path, *flags: str) -> tuple:
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_API_KEY"} | {"LOCALRUN_HOME": str(home)}
    return start_server("--n-ctx", N_CTX, "--parallel", SLOTS, *flags, env=env)


def _ask(base: str, model: str, *, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": max_tokens}
    return httpx.post(f"{base}/v1/chat/completions", json={**body, "temperature": 0, **extra}, timeout=300)


def _loaded(base: str) -> dict[str, dict]:
    return {r["id"]: r for r in httpx.get(f"{base}/v1/models", timeout=30).json()["data"] if r["loaded"]}


def _counter(base: str, name: str, reason: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(f'{name}{{reason="{reason}"}} '):
            return float(line.split()[-1])
    return 0.0


def _gone(pid: int, within_s: float = 20) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def two(home: Path):
    proc, base = _serve(home)
    yield base
    stop(proc)


def test_both_models_load_on_request_answer_and_are_listed_with_their_memory(two: str, plans: dict) -> None:
    for model in (DEFAULT, SECOND):
        reply = _ask(two, model)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == model and reply.json()["choices"][0]["message"]["content"]
    loaded = _loaded(two)
    assert set(loaded) == {DEFAULT, SECOND}
    assert loaded[DEFAULT]["pid"] != loaded[SECOND]["pid"], "each model runs in a process of its own"
    for model, row in loaded.items():
        rss = psutil.Process(row["pid"]).memory_info().rss  # the process table, read here
        assert abs(row["memory_bytes"] - rss) <= 0.1 * rss
        # what the budget planned before loading is what the process really holds, within 10 %; the plan
        # counts the prompt cache at its limit, the process holds what the cache holds now
        assert 0 < row["prompt_cache_limit_bytes"] < row["planned_bytes"]
        holds = row["planned_bytes"] - row["prompt_cache_limit_bytes"] + (row["prompt_cache_bytes"] or 0)
        assert abs(holds - rss) <= 0.1 * rss, (model, row["planned_bytes"], rss)
        assert row["planned_bytes"] == plans[model].bytes
        assert row["slots"] == int(SLOTS) and row["context_length"] == int(N_CTX) and row["device"] == "cpu"
    assert loaded[SECOND]["planned_bytes"] > loaded[DEFAULT]["planned_bytes"]  # 8-bit weights are larger


def test_localrun_ps_shows_the_loaded_models(two: str) -> None:
    _ask(two, DEFAULT)
    _ask(two, SECOND)
    result = run_localrun("ps", "--url", two)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "MEMORY", "PLANNED"]
    assert {line.split()[0] for line in lines[1:3]} == {DEFAULT, SECOND}
    assert all("(prompt cache " in line for line in lines[1:3])  # what the plan counts for it: used/limit
    assert "of a" in lines[-1] and "memory budget" in lines[-1]
    as_json = json.loads(run_localrun("ps", "--url", two, "--json").stdout)
    assert {r["id"] for r in as_json} == {DEFAULT, SECOND}


def test_ps_with_nothing_listening_is_one_sentence() -> None:
    from tests.serve_support import free_port

    result = run_localrun("ps", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode != 0 and "Nothing answers on" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_killed_model_leaves_the_other_answering_and_reloads_on_its_next_request(two: str) -> None:
    _ask(two, SECOND)
    victim = _loaded(two)[SECOND]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert _gone(victim)
    other = _ask(two, DEFAULT)
    assert other.status_code == 200 and other.json()["choices"][0]["message"]["content"]
    again = _ask(two, SECOND)
    if again.status_code == 503:  # the request that met the dead process says so; the next one reloads
        assert "model process" in again.json()["error"]["message"]
        again = _ask(two, SECOND)
    assert again.status_code == 200, again.text
    assert _loaded(two)[SECOND]["pid"] not in (None, victim)


def test_a_bad_keep_alive_is_one_sentence(two: str) -> None:
    reply = _ask(two, DEFAULT, keep_alive="soon")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "keep_alive"
    assert "is not a duration" in reply.json()["error"]["message"]


def test_concurrent_first_requests_load_a_model_once(home: Path) -> None:
    proc, base = _serve(home)
    try:
        replies: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: replies.append(_ask(base, SECOND))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        assert _counter(base, "localrun_model_loads_total", "request") == 2  # the start-up model, then SECOND once
        assert set(_loaded(base)) == {DEFAULT, SECOND}
    finally:
        stop(proc)


def test_an_idle_model_unloads_after_its_keep_alive_and_its_memory_is_returned(home: Path) -> None:
    proc, base = _serve(home, "--keep-alive", "2s")
    try:
        assert _ask(base, SECOND).status_code == 200
        pids = {model: row["pid"] for model, row in _loaded(base).items()}
        assert set(pids) == {DEFAULT, SECOND}
        for pid in pids.values():
            assert _gone(pid, within_s=15), "the idle model's process still runs"
        assert _loaded(base) == {}
        assert _counter(base, "localrun_model_unloads_total", "idle") == 2
        assert _ask(base, DEFAULT).status_code == 200  # and a new request loads it again
        # keep_alive 0 in a request unloads its model when the reply is done
        assert _ask(base, SECOND, keep_alive=0).status_code == 200
        time.sleep(1)
        assert SECOND not in _loaded(base)
    finally:
        stop(proc)


def test_a_budget_for_one_model_evicts_the_idle_one_and_waits_for_a_busy_one(home: Path, plans: dict) -> None:
    budget = int(max(p.bytes for p in plans.values()) * 1.3)
    assert budget < sum(p.bytes for p in plans.values())  # one model fits, both do not
    proc, base = _serve(home, "--memory-budget", str(budget), "--keep-alive", "-1")
    try:
        first = _loaded(base)[DEFAULT]["pid"]
        assert _ask(base, SECOND).status_code == 200
        assert set(_loaded(base)) == {SECOND} and _gone(first)
        assert _counter(base, "localrun_model_unloads_total", "evicted") == 1

        # SECOND is busy with a long reply: a request for DEFAULT waits for it, and the reply is not cut
        long_reply: dict = {}
        body = {"max_tokens": 160, "ignore_eos": True}
        worker = threading.Thread(target=lambda: long_reply.update(r=_ask(base, SECOND, **body)))
        worker.start()
        time.sleep(0.5)
        short = _ask(base, DEFAULT)
        worker.join()
        assert long_reply["r"].status_code == 200
        assert long_reply["r"].json()["usage"]["completion_tokens"] == 160
        assert long_reply["r"].json()["choices"][0]["finish_reason"] == "length"
        assert short.status_code == 200, short.text
        assert set(_loaded(base)) == {DEFAULT}
    finally:
        stop(proc)


def test_a_model_larger_than_the_whole_budget_is_refused_and_nothing_unloads(home: Path, plans: dict) -> None:
    # the default fits, the Q8_0 alone does not (the prompt cache takes only what a budget leaves: not counted)
    budget = sum(plans[m].bytes - plans[m].prompt_cache for m in (DEFAULT, SECOND)) // 2
    proc, base = _serve(home, "--memory-budget", str(budget))
    try:
        before = _loaded(base)[DEFAULT]["pid"]
        reply = _ask(base, SECOND)
        assert reply.status_code == 400
        message = reply.json()["error"]["message"]
        assert "more than the whole memory budget" in message and "--memory-budget" in message
        assert message.count(". ") == 0 and "Traceback" not in message
        assert _loaded(base)[DEFAULT]["pid"] == before and psutil.pid_exists(before)
        assert _counter(base, "localrun_model_unloads_total", "evicted") == 0
    finally:
        stop(proc)


def test_serve_flags_for_the_pool_are_checked(home: Path) -> None:
    for flags, words in ((["--keep-alive", "soon"], "--keep-alive"), (["--memory-budget", "lots"], "is not a size")):
        result = run_localrun("serve", "--port", "1", *flags, env={"LOCALRUN_HOME": str(home)})
        assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr


def test_the_system_tab_lists_loaded_models_and_unloads_one() -> None:
    """The UI's table and Unload button, on a real pool with the default model in it."""
    from types import SimpleNamespace

    from localrun.engine.messages import Loaded, LoadRequest
    from localrun.engine.pool import ModelPool, PoolPolicy
    from localrun.settings import LoadOptions
    from ui.tabs.system import loaded_models, loaded_names, unload

    pool = ModelPool(PoolPolicy(keep_alive_s=float("inf")))
    ctx = SimpleNamespace(worker=pool)
    try:
        updates = list(pool.submit(LoadRequest(None, LoadOptions(n_ctx=512))))
        assert isinstance(updates[-1], Loaded)
        table = loaded_models(ctx)
        assert list(table["Name"]) == [DEFAULT] and list(table["Unloads in"]) == ["forever"]
        pid = pool.models()[0]["pid"]
        assert unload(ctx, None) == "Pick a loaded model to unload."
        said = unload(ctx, DEFAULT)
        assert said.startswith(f"Unloaded {DEFAULT}") and _gone(pid)
        assert loaded_names(ctx) == [] and pool.counts["unload", "asked"] == 1
        assert unload(ctx, DEFAULT) == f"{DEFAULT} is not loaded."
    finally:
        pool.close()


def test_the_ui_picker_loads_a_second_model_beside_the_first_and_each_chat_keeps_its_own(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat tab's Load and Send handlers on a real pool: the second Load keeps the first model loaded, and
    a turn sent with the first model picked is answered by it, with no reload."""
    from types import SimpleNamespace

    from ui import store
    from ui.tabs.chat import load_model

    monkeypatch.setenv("LOCALRUN_HOME", str(home))
    from localrun.engine.events import GenerationEvent
    from localrun.engine.messages import GenerateRequest
    from localrun.engine.pool import ModelPool, PoolPolicy
    from localrun.settings import SamplingParams
    from ui.tabs.chat import load_request

    picks = {label.split(" ")[0]: value for label, value in store.model_choices()}
    values = {"n_ctx": 512}
    pool = ModelPool(PoolPolicy(keep_alive_s=float("inf")))
    ctx = SimpleNamespace(worker=pool, loopback=True)
    try:
        for name in (DEFAULT, SECOND):
            said = [text for text, _ in load_model(ctx, picks[name], values, owner="tab")]
            assert said[-1].startswith("**Loaded"), said
        rows = {r["name"]: r["pid"] for r in pool.models()}
        assert len(rows) == 2 and None not in rows.values()
        first = load_request(ctx, picks[DEFAULT], values)
        request = GenerateRequest.chat(
            [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4), load=first
        )
        events = [u for u in pool.submit(request, owner="tab") if isinstance(u, GenerationEvent)]
        assert events[-1].summary is not None and events[-1].summary.generated_tokens > 0
        assert pool.loaded_for(first).name == DEFAULT
        assert {r["name"]: r["pid"] for r in pool.models()} == rows  # no process restarted, nothing reloaded
        assert pool.counts["load", "request"] == 2
    finally:
        pool.close()


def test_a_load_that_waits_too_long_for_a_busy_model_fails_with_the_reason(home: Path, plans: dict) -> None:
    """memory_wait_s bounds the wait: the request for the other model fails with why, the busy reply runs on."""
    from localrun.engine.events import GenerationEvent
    from localrun.engine.messages import Failed, GenerateRequest, LoadRequest
    from localrun.engine.pool import ModelPool, PoolPolicy
    from localrun.settings import LoadOptions, SamplingParams

    options = LoadOptions(n_ctx=int(N_CTX), parallel=int(SLOTS))
    q8 = str(home / "models" / "local" / "smol" / "smol-q8.gguf")
    budget = int(max(p.bytes for p in plans.values()) * 1.3)
    pool = ModelPool(PoolPolicy(keep_alive_s=float("inf"), budget_bytes=budget, memory_wait_s=1.0))
    try:
        long = GenerateRequest.chat(
            [{"role": "user", "content": "Tell me a story."}],
            SamplingParams(temperature=0, max_tokens=240, ignore_eos=True),
            load=LoadRequest(None, options),
        )
        updates: list = []
        runner = threading.Thread(target=lambda: updates.extend(pool.submit(long, owner="a")))
        runner.start()
        deadline = time.monotonic() + 60
        while not any(r.get("state") == "busy" for r in pool.models()) and time.monotonic() < deadline:
            time.sleep(0.05)
        other = GenerateRequest.chat(
            [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4), load=LoadRequest(q8, options)
        )
        failed = [u for u in pool.submit(other, owner="b") if isinstance(u, Failed)]
        assert len(failed) == 1 and failed[0].kind == "busy", failed
        assert "busy" in failed[0].message and "retry when a reply is done" in failed[0].message
        runner.join()
        last = [u for u in updates if isinstance(u, GenerationEvent)][-1]
        assert last.summary is not None and last.summary.generated_tokens == 240  # not cut
        assert [r["name"] for r in pool.models()] == [DEFAULT]
    finally:
        pool.close()


@pytest.mark.gpu
def test_on_a_gpu_each_model_shows_its_vram_and_an_unload_returns_it(home: Path) -> None:
    """With a CUDA build and an NVIDIA GPU: both models offloaded, each row's VRAM is its process's own (as
    nvidia-smi lists it), and once the idle model unloads, its process holds no VRAM anywhere."""
    import subprocess

    from tests.conftest import llama_device

    if llama_device() != "cuda":
        pytest.skip("needs a CUDA build of llama-cpp-python and an NVIDIA GPU")

    def smi() -> dict[int, int]:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {int(p): int(m) * 2**20 for p, m in (line.split(",") for line in out.strip().splitlines() if line)}

    proc, base = _serve(home, "--keep-alive", "3s")
    try:
        assert _ask(base, SECOND).status_code == 200
        rows = _loaded(base)
        used = smi()
        for row in rows.values():
            assert row["device"] == "cuda" and row["vram_bytes"]
            assert abs(row["vram_bytes"] - used[row["pid"]]) <= 0.1 * used[row["pid"]]
        for row in rows.values():
            assert _gone(row["pid"], within_s=20)
            assert row["pid"] not in smi()
    finally:
        stop(proc)


def test_a_pinned_model_stays_loaded_when_idle_and_is_never_evicted(home: Path, plans: dict) -> None:
    budget = int(max(p.bytes for p in plans.values()) * 1.3)  # one model at a time, unless it is pinned
    proc, base = _serve(home, "--keep-alive", "1s", "--pin", DEFAULT, "--memory-budget", str(budget))
    try:
        pinned = _loaded(base)[DEFAULT]
        assert pinned["pinned"] and pinned["expires_in_s"] is None
        time.sleep(2.5)
        assert DEFAULT in _loaded(base)  # idle past its keep-alive, and still loaded
        reply = _ask(base, SECOND)  # it cannot fit beside the pinned model, which is not evicted for it
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "memory_busy"
        assert "pinned models hold" in reply.json()["error"]["message"]
        assert _loaded(base)[DEFAULT]["pid"] == pinned["pid"]
    finally:
        stop(proc)

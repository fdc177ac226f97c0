"""The model worker process (localrun.engine.worker): load, queued typed requests from several owners, Stop, errors,
and the watchdog. Real default model."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_stall import StallRequest

from localrun.engine.events import GenerationEvent
from localrun.engine.messages import Failed, GenerateRequest, Loaded, LoadRequest, Progress
from localrun.engine.worker import WorkerClient
from localrun.errors import UserError
from localrun.settings import LoadOptions, SamplingParams

HELLO = ({"role": "user", "content": "Hello"},)
SHORT = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerClient]:
    client = WorkerClient(start=False)
    yield client
    client.close()
    assert not client.status()["alive"]


def events(updates: list) -> list[GenerationEvent]:
    return [u for u in updates if isinstance(u, GenerationEvent)]


def collect(client: WorkerClient, request, owner: str = "", into: list | None = None) -> list:
    out = [] if into is None else into
    for update in client.submit(request, owner=owner):
        out.append(update)
    return out


def in_thread(client: WorkerClient, request, owner: str) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=collect, args=(client, request, owner, got), daemon=True)
    thread.start()
    return thread, got


def wait_for(got: list, what, timeout_s: float = 120) -> None:
    deadline = threading.Event()
    for _ in range(int(timeout_s * 20)):
        if any(what(u) for u in list(got)):
            return
        deadline.wait(0.05)
    raise AssertionError(f"never saw it in {got}")


def test_a_second_load_while_loading_is_refused(worker: WorkerClient) -> None:
    first = worker.submit(LoadRequest())
    assert isinstance(next(first), Progress)
    with pytest.raises(UserError, match="loading already"):
        next(worker.submit(LoadRequest()))
    rest = list(first)
    assert isinstance(rest[-1], Loaded) and rest[-1].report.backend == "llamacpp"
    again = list(worker.submit(LoadRequest(None, LoadOptions())))  # the same model and options: nothing to do
    assert again == [rest[-1]]


def test_a_bad_model_is_a_user_error_and_the_model_stays(worker: WorkerClient, tmp_path: Path) -> None:
    updates = list(worker.submit(LoadRequest("/no/such/model.gguf")))
    assert isinstance(updates[-1], Failed) and updates[-1].kind == "user"
    assert "/no/such/model.gguf" in updates[-1].message
    assert worker.status()["alive"] and worker.loaded is not None  # the current model is kept
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(20))
    updates = list(worker.submit(LoadRequest(str(corrupt))))
    assert isinstance(updates[-1], Failed) and updates[-1].kind == "user" and worker.loaded is not None


def test_chat_loads_its_model_when_none_is_loaded() -> None:
    fresh = WorkerClient(start=False)
    try:
        updates = list(fresh.submit(GenerateRequest.chat(HELLO, SHORT, load=LoadRequest()), owner="x"))
        assert fresh.loaded is not None and any(isinstance(u, Loaded) for u in updates)
        final = events(updates)[-1]
        assert final.finish_reason == "length" and final.generated_tokens == 4
        again = list(fresh.submit(GenerateRequest.chat(HELLO, SHORT, load=LoadRequest()), owner="x"))
        assert not any(isinstance(u, Loaded) for u in again)  # already loaded: straight to the answer
    finally:
        fresh.close()


def test_requests_queue_and_stop_only_reaches_its_owner(worker: WorkerClient) -> None:
    long = SamplingParams(max_tokens=3000, ignore_eos=True, temperature=0)
    thread, got_a = in_thread(worker, GenerateRequest.chat(HELLO, long), "a")
    wait_for(got_a, lambda u: isinstance(u, GenerationEvent))
    b = worker.submit(GenerateRequest.chat(HELLO, SHORT), owner="b")
    assert next(b) == Progress("Waiting for 1 earlier request(s) to finish")
    assert worker.cancel("b")  # B is stopped while queued; A goes on
    assert not any(isinstance(u, GenerationEvent) and u.is_final for u in got_a)
    assert worker.cancel("a")
    thread.join(120)
    assert list(b) == [Progress("Stopped before it started.")]
    a_events = events(got_a)
    assert a_events[-1].finish_reason == "cancelled" and a_events[-1].generated_tokens < 3000
    counts = [e.generated_tokens for e in a_events[:-1]]
    # One uninterrupted stream: the first token at once, then growing counts (events merged at most 20 a second).
    assert counts[0] == 1 and counts == sorted(set(counts)), counts
    assert not worker.cancel("a")  # nothing left to stop


# ---- the watchdog --------------------------------------------------------------------------------------


def _chat_works(client: WorkerClient, *, within_s: float) -> list:
    """A chat (loading the default model) must end within within_s: a hang fails instead of blocking the suite."""
    thread, got = in_thread(client, GenerateRequest.chat(HELLO, SHORT, load=LoadRequest()), "next")
    thread.join(within_s)
    assert not thread.is_alive(), f"the next chat did not finish in {within_s} s: {got}"
    assert events(got)[-1].generated_tokens == 4, got
    return got


def test_a_worker_killed_inside_the_stop_check_does_not_block_the_next_chat() -> None:
    client = WorkerClient(start=False, plugins=("worker_stall",))
    try:
        thread, got = in_thread(client, StallRequest(600, mode="cancel"), "a")
        wait_for(got, lambda u: u == Progress("stalling"))
        os.kill(client.status()["pid"], signal.SIGKILL)  # it spends all its time reading the Stop value
        client.cancel("a")
        thread.join(10)
        assert not thread.is_alive() and isinstance(got[-1], Failed) and "SIGKILL" in got[-1].message
        # The old shared Event blocked right here, forever. The next chat (a fresh worker, loading the
        # model, 4 tokens) must finish within 10 s: about 3 s on a 2-core box.
        thread, got = in_thread(client, GenerateRequest.chat(HELLO, SHORT, load=LoadRequest()), "next")
        wait_for(got, lambda u: u == Progress("Starting the model process"), timeout_s=10)
        thread.join(10)
        assert not thread.is_alive() and events(got)[-1].generated_tokens == 4, got
    finally:
        client.close()


def test_stop_frees_the_caller_of_a_worker_stuck_in_a_native_call() -> None:
    client = WorkerClient(start=False, plugins=("worker_stall",), stop_grace_s=1.0)
    try:
        _chat_works(client, within_s=120)  # the model is loaded: the restart must reload it
        thread, got = in_thread(client, StallRequest(600), "a")
        wait_for(got, lambda u: u == Progress("stalling"))
        pid = client.status()["pid"]
        assert client.cancel("a")
        thread.join(60)
        assert not thread.is_alive()
        failed = got[-1]
        assert isinstance(failed, Failed) and failed.kind == "crash"
        assert re.search(r"did not stop within \d+ s of Stop", failed.message) and "\n" not in failed.message
        assert client.status()["crashes"] == 1 and client.loaded is None
        got = _chat_works(client, within_s=120)
        assert any(isinstance(u, Loaded) for u in got) and client.status()["pid"] != pid
    finally:
        client.close()


def test_a_silent_worker_is_killed_and_a_beating_one_is_not() -> None:
    client = WorkerClient(start=False, plugins=("worker_stall",), silence_s=2.0)
    try:
        got = collect(client, StallRequest(5, mode="job"), "a")  # 5 s busy, with heartbeats: left alone
        assert got[-1] == Progress("done stalling") and client.status()["crashes"] == 0
        got = collect(client, StallRequest(600), "a")  # no heartbeat, no reply
        assert isinstance(got[-1], Failed) and "sent nothing for 2 s" in got[-1].message
        assert client.status()["crashes"] == 1
    finally:
        client.close()


# ---- several at once ------------------------------------------------------------------------------------


def test_two_chats_queued_before_the_dispatcher_sends_either_are_not_told_to_wait() -> None:
    """Two chats that reach the queue in the same instant both fit two slots: neither hears 'Waiting' (CI once saw
    the second one counted behind the first, which the dispatcher had not sent yet)."""
    client = WorkerClient(start=False)
    load = LoadRequest(None, LoadOptions(parallel=2, n_ctx=1024))
    try:
        assert any(isinstance(u, Loaded) for u in list(client.submit(load)))  # the load runs to its end
        held = threading.Event()
        send = client._start_ready
        client._start_ready = lambda: send() if held.is_set() else None  # the dispatcher sends nothing for now
        a, got_a = in_thread(client, GenerateRequest.chat(HELLO, SHORT, load=load), "a")
        b, got_b = in_thread(client, GenerateRequest.chat(HELLO, SHORT, load=load), "b")
        for _ in range(200):
            if client.status()["queued"] == 2:
                break
            held.wait(0.05)
        assert client.status()["queued"] == 2
        c = client.submit(GenerateRequest.chat(HELLO, SHORT, load=load), owner="c")
        assert next(c) == Progress("Waiting for 2 earlier request(s) to finish")  # a third does wait
        held.set()
        client._wake()
        a.join(60)
        b.join(60)
        assert not any(isinstance(u, Progress) and "Waiting" in u.text for u in got_a + got_b)
        for got in (got_a, got_b, list(c)):
            assert events(got)[-1].finish_reason == "length" and events(got)[-1].generated_tokens == 4
    finally:
        client.close()


def test_with_two_slots_two_chats_stream_at_once_and_a_third_waits() -> None:
    client = WorkerClient(start=False)
    load = LoadRequest(None, LoadOptions(parallel=2, n_ctx=1024))
    try:
        loaded = [u for u in client.submit(load) if isinstance(u, Loaded)]
        assert loaded and loaded[0].report.parallel == 2 and client.status()["slots"] == 2
        long = SamplingParams(max_tokens=3000, ignore_eos=True, temperature=0)
        a, got_a = in_thread(client, GenerateRequest.chat(HELLO, long, load=load), "a")
        b, got_b = in_thread(client, GenerateRequest.chat(HELLO, long, load=load), "b")
        wait_for(got_a, lambda u: isinstance(u, GenerationEvent))
        wait_for(got_b, lambda u: isinstance(u, GenerationEvent))  # b did not wait for a
        assert not any(isinstance(u, Progress) and "Waiting" in u.text for u in got_a + got_b)
        assert client.status()["running"] == 2
        c = client.submit(GenerateRequest.chat(HELLO, SHORT, load=load), owner="c")
        assert next(c) == Progress("Waiting for 2 earlier request(s) to finish")
        assert client.cancel("a")  # Stop reaches a only: b goes on, and c takes a's slot
        a.join(60)
        assert events(got_a)[-1].finish_reason == "cancelled"
        rest = list(c)
        assert events(rest)[-1].generated_tokens == 4 and events(rest)[-1].finish_reason == "length"
        assert not any(isinstance(u, GenerationEvent) and u.is_final for u in got_b)
        assert client.cancel("b")
        b.join(60)
        assert events(got_b)[-1].finish_reason == "cancelled"
        text_a = "".join(e.text for e in events(got_a))
        text_b = "".join(e.text for e in events(got_b))
        n = min(len(text_a), len(text_b))
        assert n > 0 and text_a[:n] == text_b[:n]  # the same greedy chat, decoded side by side
    finally:
        client.close()

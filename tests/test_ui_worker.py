"""The UI's model worker process: load, queued requests from several owners, Stop, errors. Real default model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from localrun.errors import UserError
from localrun.events import GenerationEvent
from localrun.settings import LoadOptions, SamplingParams
from ui.worker import Failed, Loaded, Progress, WorkerClient

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerClient]:
    client = WorkerClient(start=False)
    yield client
    client.close()
    assert not client.status()["alive"]


def events(updates: list) -> list[GenerationEvent]:
    return [u for u in updates if isinstance(u, GenerationEvent)]


def test_a_second_load_while_loading_is_refused(worker: WorkerClient) -> None:
    first = worker.load(None, LoadOptions())
    assert isinstance(next(first), Progress)
    with pytest.raises(UserError, match="loading already"):
        next(worker.load(None, LoadOptions()))
    rest = list(first)
    assert isinstance(rest[-1], Loaded) and rest[-1].report.backend == "llamacpp"
    again = list(worker.load(None, LoadOptions()))  # the same model and options: nothing to do
    assert again == [rest[-1]]


def test_a_bad_model_is_a_user_error_and_the_model_stays(worker: WorkerClient, tmp_path: Path) -> None:
    updates = list(worker.load("/no/such/model.gguf", LoadOptions()))
    assert isinstance(updates[-1], Failed) and updates[-1].kind == "user"
    assert "/no/such/model.gguf" in updates[-1].message
    assert worker.status()["alive"] and worker.loaded is not None  # the current model is kept
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(20))
    updates = list(worker.load(str(corrupt), LoadOptions()))
    assert isinstance(updates[-1], Failed) and updates[-1].kind == "user" and worker.loaded is not None


def test_chat_loads_the_fallback_model_when_none_is_loaded() -> None:
    fresh = WorkerClient(start=False)
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
        updates = list(fresh.chat(HELLO, params=params, owner="x", fallback=(None, LoadOptions())))
        assert fresh.loaded is not None and any(isinstance(u, Loaded) for u in updates)
        final = events(updates)[-1]
        assert final.finish_reason == "length" and final.generated_tokens == 4
    finally:
        fresh.close()


def test_requests_queue_and_stop_only_reaches_its_owner(worker: WorkerClient) -> None:
    long = SamplingParams(max_tokens=3000, ignore_eos=True, temperature=0)
    short = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    got: dict[str, list] = {"a": [], "b": []}
    started = threading.Event()

    def run_a() -> None:
        for update in worker.chat(HELLO, params=long, owner="a"):
            got["a"].append(update)
            started.set()

    thread = threading.Thread(target=run_a)
    thread.start()
    assert started.wait(120)
    b = worker.chat(HELLO, params=short, owner="b")
    assert next(b) == Progress("Waiting for 1 earlier request(s) to finish")
    assert worker.cancel("b")  # B is stopped while queued; A goes on
    assert not any(isinstance(u, GenerationEvent) and u.is_final for u in got["a"])
    assert worker.cancel("a")
    thread.join(120)
    assert list(b) == [Progress("Stopped before it started.")]
    a_events = events(got["a"])
    assert a_events[-1].finish_reason == "cancelled" and a_events[-1].generated_tokens < 3000
    counts = [e.generated_tokens for e in a_events[:-1]]
    assert counts == list(range(1, len(counts) + 1))  # one uninterrupted stream
    assert not worker.cancel("a")  # nothing left to stop

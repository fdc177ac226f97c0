"""The remote backend against a real `localrun serve` on loopback (the default model): chat, stream, Stop that
reaches the remote, the server's own counts, and each error as one sentence with the key never shown."""

from __future__ import annotations

import threading

import pytest

from localrun.backends import load_backend
from localrun.chat import ChatSession
from localrun.errors import UserError
from localrun.generate import stream_generate
from localrun.settings import LoadOptions, SamplingParams
from tests.serve_support import KEY, free_port, keyed_server, metric


@pytest.fixture(scope="module")
def server():
    yield from keyed_server()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "key"
    path.write_text(KEY + "\n")
    return str(path)


@pytest.fixture(scope="module")
def remote(server, key_file):
    backend = load_backend(None, LoadOptions(backend="remote", url=f"{server}/v1", remote_api_key_file=key_file))
    yield backend
    backend.close()


def test_the_engine_model_and_context_are_found(remote) -> None:
    report = remote.report
    assert remote.engine == "localrun" and remote.model == "smollm2-135m-instruct"
    assert report.backend == "remote" and report.device.startswith("localrun at 127.0.0.1:")
    assert report.n_ctx > 0 and report.parallel >= 1 and remote.rtt_s > 0
    assert "round trip" in report.describe()


def test_a_chat_streams_with_the_servers_own_counts(remote) -> None:
    session = ChatSession(remote)
    params = SamplingParams(temperature=0, max_tokens=24)
    events = list(session.send("What is the capital of France?", params))
    final = events[-1]
    summary = final.summary
    assert summary.error is None and summary.finish_reason in ("stop", "length", "repetition")
    assert "Paris" in summary.text and len(events) > 2  # streamed in pieces
    assert summary.prompt_tokens > 5 and 0 < summary.generated_tokens <= 24  # the server's usage, not pieces
    assert summary.ttft_s > 0 and summary.decode_tps and summary.backend == "remote"
    assert summary.peak_ram_bytes and summary.peak_ram_bytes > 50e6  # the remote model process's RSS
    assert session.messages[-1] == {"role": "assistant", "content": summary.text}


def test_stop_mid_reply_stops_the_remote_too(remote, server) -> None:
    before = metric(server, "localrun_cancelled_total")
    cancel = threading.Event()
    ids = remote.tokenize(remote.render_chat([{"role": "user", "content": "Count to one thousand."}]))
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    for event in stream_generate(remote, ids, params, cancel=cancel):
        if event.generated_tokens >= 8:
            cancel.set()
    assert event.finish_reason == "cancelled"
    for _ in range(200):  # the server notices the closed connection within its poll, and stops the model
        if metric(server, "localrun_cancelled_total") > before and metric(server, "localrun_slots_busy") == 0:
            break
        threading.Event().wait(0.1)
    assert metric(server, "localrun_cancelled_total") == before + 1  # stopped there, not run on to 400 tokens
    assert metric(server, "localrun_slots_busy") == 0


def test_a_setting_the_engine_lacks_is_refused_not_dropped(remote) -> None:
    remote_engine = remote.engine
    try:
        remote.engine, remote.fields = "TGI", {"temperature": "temperature"}
        with pytest.raises(UserError, match=r"does not take top_k"):
            remote.sampling(SamplingParams(top_k=5))
        assert remote.sampling(SamplingParams(temperature=0.2)) == {"max_tokens": 512, "temperature": 0.2}
    finally:
        remote.engine = remote_engine


@pytest.mark.parametrize(
    "case, says",
    [
        ("nothing listening", "Nothing answers at http://127.0.0.1:"),
        ("wrong key", "refused the API key (401)"),
        ("unknown model", "has no model 'no-such-model'"),
    ],
)
def test_errors_are_one_sentence_without_the_key(server, key_file, tmp_path, case, says) -> None:
    url, model, keys = f"{server}/v1", "no-such-model" if case == "unknown model" else None, key_file
    if case == "nothing listening":
        url = f"http://127.0.0.1:{free_port()}/v1"
    if case == "wrong key":
        keys = tmp_path / "wrong"
        keys.write_text("not-the-key-" + KEY)
    with pytest.raises(UserError) as err:
        load_backend(model, LoadOptions(backend="remote", url=url, remote_api_key_file=str(keys)))
    message = str(err.value)
    assert says in message and "\n" not in message and KEY not in message


def test_the_cli_chats_with_a_remote_engine(server, key_file, cli) -> None:
    result = cli("chat", "--url", server, "--remote-api-key-file", key_file, "-p", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "remote/localrun at 127.0.0.1" in result.stderr


def test_memory_a_remote_engine_does_not_report_is_shown_as_unknown(remote) -> None:
    """vLLM, TGI and llama-server say nothing of memory: RAM is None, and the API's metrics and the UI's live
    charts take that without failing."""
    from dataclasses import replace

    from localrun.format import stats_line
    from localrun.server.metrics import Metrics
    from ui.metrics import LiveSeries

    route, remote.memory_route = remote.memory_route, None
    try:
        ids = remote.tokenize(remote.render_chat([{"role": "user", "content": "Hi"}]))
        events = list(stream_generate(remote, ids, SamplingParams(temperature=0, max_tokens=8)))
    finally:
        remote.memory_route = route
    summary = events[-1].summary
    assert summary.peak_ram_bytes is None and events[0].ram_bytes is None
    assert "RAM n/a" in stats_line(summary)
    metrics = Metrics()
    metrics.observe(summary, ttft_s=summary.ttft_s, latency_s=summary.total_s)
    metrics.observe(replace(summary, peak_ram_bytes=5), ttft_s=summary.ttft_s, latency_s=summary.total_s)
    assert metrics.peak_ram_bytes == 5
    series = LiveSeries()
    for event in events:
        series.add(event)
    assert "RAM" not in series.memory

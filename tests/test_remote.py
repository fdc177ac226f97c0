"""The remote backend against a real `localrun serve` on loopback (the default model): chat, stream, Stop that
reaches the remote, the server's own counts, and each error as one sentence with the key never shown."""

from __future__ import annotations

import threading

import pytest

from localrun.backends import load_backend
from localrun.engine.chat import ChatSession
from localrun.engine.generate import stream_generate
from localrun.errors import UserError
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
    result = cli(
        "chat",
        "--url",
        server,
        "--remote-api-key-file",
        key_file,
        "--temperature",
        "0",
        "-p",
        "What is the capital of France?",
    )
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


def test_bench_measures_a_remote_engine_with_clients_at_once(server, key_file, cli) -> None:
    """`localrun bench` on a remote: each level's requests reach the engine, which counts exactly what was asked."""
    import json

    before = metric(server, "localrun_completion_tokens_total")
    args = ("bench", "--url", server, "--remote-api-key-file", key_file, "--clients", "1,2", "--n-prompt", "32")
    result = cli(*args, "--n-gen", "8", "--reps", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engine"] == "localrun" and report["backend"] == "remote" and report["slots"] >= 2
    assert report["model"] == "smollm2-135m-instruct" and report["round_trip_s"] > 0
    assert [row["clients"] for row in report["levels"]] == [1, 2]
    for row in report["levels"]:
        assert row["generated_tokens"] == 8 and row["prompt_tokens"] > 16  # the engine's own usage counts
        assert row["ttft_s"]["p50"] > 0 and row["decode_tps"] > 0 and row["total_tps"] > 0
        assert row["peak_ram_bytes"] > 50e6  # the remote model process, from its /metrics
    # a warm-up, then one request and two at once: 4 requests of 8 tokens reached the engine
    assert metric(server, "localrun_completion_tokens_total") == before + 32
    assert KEY not in result.stdout + result.stderr


def test_a_saved_endpoint_names_the_remote_model(server, key_file, cli, tmp_path) -> None:
    import json

    env = {"LOCALRUN_HOME": str(tmp_path)}
    added = cli("endpoints", "add", "box", server, "--api-key-file", key_file, env=env)
    assert added.returncode == 0 and "box:MODEL" in added.stdout, added.stderr
    assert KEY not in (tmp_path / "endpoints.json").read_text()  # only the key file's path is saved
    listed = json.loads(cli("endpoints", "list", "--check", "--json", env=env).stdout)
    assert listed[0]["engine"] == "localrun" and listed[0]["models"] == ["smollm2-135m-instruct"]
    chat = cli(
        "chat", "box:smollm2-135m-instruct", "--temperature", "0", "-p", "What is the capital of France?", env=env
    )
    assert chat.returncode == 0 and "Paris" in chat.stdout, chat.stderr
    assert "remote/localrun at 127.0.0.1" in chat.stderr
    unknown = cli("chat", "box:no-such-model", "-p", "Hi", env=env)
    assert unknown.returncode == 2 and "has no model 'no-such-model'" in unknown.stderr
    for bad, says in [
        (("smollm2-135m-instruct", server), "is a model in the catalog"),
        (("x", "ftp://h"), "not an engine address"),
    ]:
        refused = cli("endpoints", "add", *bad, env=env)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr
    assert cli("endpoints", "rm", "box", env=env).returncode == 0
    gone = cli("chat", "box:smollm2-135m-instruct", "-p", "Hi", env=env)
    assert gone.returncode == 2 and "Unknown model" in gone.stderr


def test_serve_proxies_a_remote_engine_and_adds_its_own_metrics(server, key_file) -> None:
    """`localrun serve --url REMOTE`: the official client talks to the proxy, the proxy streams from the remote,
    and both count the same tokens."""
    import os

    from openai import OpenAI

    from tests.serve_support import start_server, stop

    proc, proxy = start_server("--url", server, "--remote-api-key-file", key_file, env=dict(os.environ))
    try:
        remote_before = metric(server, "localrun_completion_tokens_total")
        client = OpenAI(base_url=f"{proxy}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert "Paris" in text and len(chunks) > 3  # streamed through, piece by piece
        assert 0 < usage.completion_tokens <= 16 and usage.prompt_tokens > 5
        assert metric(server, "localrun_completion_tokens_total") == remote_before + usage.completion_tokens
        assert metric(proxy, "localrun_completion_tokens_total") == usage.completion_tokens
        assert (
            metric(proxy, "localrun_ttft_seconds_count") == 1 and metric(proxy, "localrun_model_peak_ram_bytes") > 50e6
        )
    finally:
        stop(proc)


def test_a_damaged_endpoints_file_is_one_sentence_and_local_models_still_load(cli, tmp_path) -> None:
    (tmp_path / "endpoints.json").write_text("{not json")
    env = {"LOCALRUN_HOME": str(tmp_path)}
    listed = cli("endpoints", "list", env=env)
    assert listed.returncode == 2 and "is not a localrun endpoints file" in listed.stderr
    assert "Traceback" not in listed.stderr
    local = cli("chat", "-p", "Hi", "--max-tokens", "2", env=env)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "endpoints.json").read_text() == "{not json"  # nothing lost


def test_a_key_file_with_more_than_one_line_is_refused_without_showing_it(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\nsecond-" + KEY + "\n")
    with pytest.raises(UserError, match="holds more than one key") as err:
        load_backend(None, LoadOptions(backend="remote", url="http://127.0.0.1:9/v1", remote_api_key_file=str(keys)))
    assert KEY not in str(err.value)


def test_a_compare_arena_runs_a_local_and_a_remote_variant(server, key_file, cli, tmp_path) -> None:
    """`compare --arena`: the default model as it is, then the remote engine (a saved endpoint with its key) and a
    port with nothing listening. Each answer streams under its name, then the table; the dead port is one error
    row and the others still ran. The JSON has the remote's own memory and no size or quality figures."""
    import json

    env = {"LOCALRUN_HOME": str(tmp_path)}
    assert cli("endpoints", "add", "box", server, "--api-key-file", key_file, env=env).returncode == 0
    dead = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "out"
    args = ("compare", "--arena", "default", "--remote", "box:", "--remote", dead, "--max-tokens", "16")
    result = cli(*args, "--out", str(out), env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    local, remote = "SmolLM2-135M-Instruct.Q4_1", "box"
    assert text.index(f"── {local} ──") < text.index(f"── {remote} ──") < text.index(f"── {dead} ──")
    answers = text.split("── ")
    assert "Paris" in answers[1] and "Paris" in answers[2]  # both answered the prompt
    assert f"error: Nothing answers at {dead}" in answers[3]
    table = text[text.index("variant ") :]
    assert "localrun at 127.0.0.1" in table and " n/a " not in table.splitlines()[2]  # this engine reports memory
    rows = {r["label"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert list(rows) == [local, remote, dead]
    assert rows[local]["kind"] == "gguf" and rows[local]["size_bytes"] > 50e6 and rows[local]["ppl"] is None
    mine = rows[remote]
    assert mine["kind"] == "remote" and mine["size_bytes"] == 0 and mine["bits_per_weight"] is None
    assert mine["ttft_s"] > 0 and mine["decode_tps"] > 0 and mine["peak_ram_bytes"] > 50e6
    assert "round trip" in mine["device"] and "quality not measured" in mine["note"] and mine["ppl"] is None
    assert "Nothing answers at" in rows[dead]["error"]
    assert (out / "speed_vs_size.png").is_file()  # the charts leave out what has no size
    assert KEY not in text + result.stderr + (out / "compare.json").read_text()


def test_the_ui_arena_streams_a_remote_column(server, key_file, tmp_path, monkeypatch) -> None:
    """The Compare tab's arena with a remote engine in its box and no level ticked: the model as it is, then the
    remote, each column done with its speed; a spec that is no engine is that column's sentence."""
    from localrun.models.endpoints import add_endpoint
    from ui.tabs.compare import arena

    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path))
    add_endpoint("box", server, key_file)
    frames = list(arena("smollm2-135m-instruct", [], False, False, "What is the capital of France?", "box:\nnot-one"))
    page, status = frames[-1]
    assert status == "Arena finished."
    assert page.count("data-state='done'") == 2 and "data-variant='box'" in page
    assert "localrun at 127.0.0.1" in page and "Paris" in page
    assert "data-variant='not-one' data-state='error'" in page and "is not a remote engine" in page
    streamed = [p for p, _ in frames if "data-variant='box' data-state='running'" in p]
    assert len(streamed) >= 2  # the remote's answer arrived in pieces

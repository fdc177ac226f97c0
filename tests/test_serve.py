"""`localrun serve` against the official openai client, on the default model, on a free loopback port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO, run_localrun
from tests.serve_support import KEY, N_CTX, free_port, keyed_server, metric, start_server, stop

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    yield from keyed_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models(client, model):
    from localrun.models.catalog import DEFAULT_MODEL_NAME

    ids = [m.id for m in client.models.list().data]
    assert ids[0] == model == DEFAULT_MODEL_NAME
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model-anywhere")
    assert err.value.status_code == 404 and err.value.type == "invalid_request_error"
    assert err.value.code == "model_not_found"


def test_chat_streaming_matches_whole_reply(client, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 5
    assert whole.model_extra["localrun"]["ttft_s"] > 0
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same tokens either way
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_streaming_without_usage_has_none(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True, seed=1
        )
    )
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason


def test_omitted_fields_take_the_models_recommended_settings(client, model):
    """Sampling fields left out, and a missing system message, come from the catalog, as in `localrun chat`."""
    from localrun.models.catalog import find_model

    recommended = find_model(model).recommended
    sampling = recommended.sampling()
    question = {"role": "user", "content": "What is the capital of France?"}
    implicit = client.chat.completions.create(model=model, messages=[question], max_tokens=16, seed=7)
    explicit = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": recommended.system}, question],
        max_tokens=16,
        seed=7,
        temperature=sampling["temperature"],
        top_p=sampling["top_p"],
        extra_body={"repetition_penalty": sampling["repeat_penalty"]},
    )
    assert implicit.usage.prompt_tokens == explicit.usage.prompt_tokens
    assert implicit.choices[0].message.content == explicit.choices[0].message.content


def test_request_fields_override_the_defaults():
    from localrun.server.convert import sampling
    from localrun.server.protocol import ChatBody, parse_body
    from localrun.settings import SamplingParams

    body = parse_body(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0.5}), ChatBody
    )
    params = sampling(body, defaults={"temperature": 0.1, "top_p": 0.9, "repeat_penalty": 1.1})
    assert (params.temperature, params.top_p, params.repeat_penalty) == (0.1, 0.5, 1.1)
    assert sampling(body).temperature == SamplingParams().temperature  # no recommendation: the usual default


def test_completions(client, model):
    whole = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    stream = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert whole.choices[0].text and "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    assert whole.usage.completion_tokens <= 8


@pytest.mark.parametrize(
    ("body", "status", "error_type", "param"),
    [
        (
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            404,
            "invalid_request_error",
            "model",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "invalid_request_error",
            "temperature",
        ),
        ({"model": "M", "messages": "hello"}, 400, "invalid_request_error", "messages"),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": N_CTX * 4},
            400,
            "invalid_request_error",
            None,
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "hello " * N_CTX}]},
            400,
            "invalid_request_error",
            None,
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            400,
            "invalid_request_error",
            "logprobs",
        ),
        ({"model": "M", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "invalid_request_error", "n"),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5},
            400,
            "invalid_request_error",
            "presence_penalty",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
            400,
            "invalid_request_error",
            "stream_options",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "invalid_request_error",
            "top_logprobs",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"50": 3}},
            400,
            "invalid_request_error",
            "logit_bias",
        ),
        (
            {"model": "M", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "invalid_request_error",
            "messages.0.role",
        ),
    ],
    ids=[
        "unknown-model",
        "wrong-type",
        "messages-not-a-list",
        "max-tokens-0",
        "max-tokens-past-context",
        "prompt-longer-than-context",
        "unsupported-field",
        "n-2",
        "presence-penalty",
        "stream-options-without-stream",
        "top-logprobs",
        "logit-bias",
        "unknown-role",
    ],
)
def test_bad_requests(server, client, model, body, status, error_type, param):
    body = {**body, "model": model if body["model"] == "M" else body["model"]}
    counter = 'localrun_requests_total{route="/v1/chat/completions",status="%s"}'
    before = {s: metric(server, counter % s) for s in (str(status), "error")}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**body)
    assert err.value.status_code == status
    assert err.value.type == error_type and err.value.body["message"]
    assert err.value.body["param"] == param
    # counted once, under its status (a prompt too long for the context was once counted as an error too)
    assert {s: metric(server, counter % s) for s in before} == {
        str(status): before[str(status)] + 1,
        "error": before["error"],
    }


def test_malformed_json_and_keys(server, model):
    url = f"{server}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(url, content=b'{"model": "x", "messages": [', headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in bad.json()["error"]["message"]
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    missing = httpx.post(url, json=body)
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    for reply in (missing, wrong):
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # for load balancers: no key, no data


def test_disconnect_cancels_and_frees_the_model(server, client, model):
    cancelled_before = metric(server, "localrun_cancelled_total")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=600) as reply:
        lines = reply.iter_lines()
        got = [line for line, _ in zip(lines, range(12), strict=False) if line.startswith("data:")]
        assert len(got) >= 4  # the role chunk and a few tokens, then we hang up
    deadline = time.monotonic() + 120
    while metric(server, "localrun_cancelled_total") <= cancelled_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "localrun_cancelled_total") == cancelled_before + 1
    # stopped between two tokens: after the cancel, at most the token being computed when Stop landed came
    # out, plus one already in the pipe from the model process
    assert metric(server, "localrun_cancel_overrun_tokens_sum") <= 2
    assert httpx.get(f"{server}/health").json()["busy"] is False
    after = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert after.usage.completion_tokens >= 1


def test_a_model_loaded_by_its_store_name_keeps_that_name(tmp_path):
    """A store file's id is repo:file; once loaded it stays under that id (not its file name as well)."""
    from localrun.models.catalog import default_model_path

    folder = tmp_path / "home" / "models" / "me" / "tiny"
    folder.mkdir(parents=True)
    (folder / "copy.gguf").symlink_to(default_model_path())
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_API_KEY"} | {"LOCALRUN_HOME": str(tmp_path / "home")}
    proc, base = start_server(env=env)
    try:
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        name = "me/tiny:copy.gguf"
        assert name in [m.id for m in api.models.list().data]
        api.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        rows = httpx.get(f"{base}/v1/models").json()["data"]
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) and [r["id"] for r in rows if r["loaded"]] == [name]
        assert httpx.get(f"{base}/health").json()["model"] == name
        again = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert again.model == name
    finally:
        stop(proc)


def test_non_loopback_host_needs_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_API_KEY"}
    result = run_localrun("serve", "--host", "0.0.0.0", "--port", str(free_port()), env=env)
    assert result.returncode == 2 and "api-key" in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "key"
    empty.write_text("\n")
    result = run_localrun("serve", "--api-key-file", str(empty), env=env)
    assert result.returncode == 2 and "empty" in result.stderr


def test_full_queue_answers_429_and_a_queued_request_waits(tmp_path):
    """--parallel 2 --max-queue 1: two requests run at once, one waits (and is answered), the next is refused
    with a 429; 429 comes only once the queue beyond the slots is full. The key comes from --api-key-file."""
    import contextlib
    import threading

    key_file = tmp_path / "key"
    key_file.write_text("file-key-9d2e\n")
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_API_KEY"}
    proc, base = start_server("--parallel", "2", "--max-queue", "1", "--api-key-file", str(key_file), env=env)
    headers = {"Authorization": "Bearer file-key-9d2e"}
    url = f"{base}/v1/chat/completions"
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="file-key-9d2e", max_retries=0, timeout=600)
    try:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        model = api.models.list().data[0].id
        long = {"model": model, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 1500}
        long |= {"ignore_eos": True, "stream": True}
        held = []
        with contextlib.ExitStack() as streams:
            for _ in range(2):  # both slots busy, neither queued
                running = streams.enter_context(httpx.stream("POST", url, json=long, headers=headers, timeout=600))
                lines = running.iter_lines()  # held open: a closed line iterator would hang up on the server
                next(line for line in lines if line.startswith("data:"))  # it is generating
                held.append(lines)
            health = httpx.get(f"{base}/health").json()
            assert health["queued"] == 0 and health["running"] == 2, health
            # /metrics shows the batching engine: both sequences in one decode step
            figures: dict[str, float] = {}
            deadline = time.monotonic() + 30
            while figures.get("localrun_batch_size") != 2 and time.monotonic() < deadline:
                time.sleep(0.2)
                text = httpx.get(f"{base}/metrics", headers=headers).text
                figures = {k: float(v) for k, v in re.findall(r"^(localrun_\w+) (\S+)$", text, re.MULTILINE)}
            assert figures.get("localrun_batch_size") == 2, figures
            assert figures["localrun_decode_sequences_total"] > figures["localrun_decode_steps_total"] > 0
            assert "# TYPE localrun_decode_steps_total counter" in text
            waited: list = []
            short = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
            waiter = threading.Thread(target=lambda: waited.append(api.chat.completions.create(**short)))
            waiter.start()
            deadline = time.monotonic() + 60
            while httpx.get(f"{base}/health").json()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert httpx.get(f"{base}/health").json()["queued"] == 1
            with pytest.raises(openai.RateLimitError) as err:
                api.chat.completions.create(**short)
            assert err.value.status_code == 429 and err.value.type == "rate_limit_error"
            assert err.value.code == "queue_full" and waiter.is_alive()
        waiter.join(timeout=300)  # hanging up freed the model: the waiting request runs
        assert waited and waited[0].usage.completion_tokens >= 1
    finally:
        stop(proc)


def test_ui_api_serves_both_on_one_port():
    """`localrun ui --api`: the Gradio page and the OpenAI API on one port, on the UI's model worker."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "localrun.cli", "ui", "--api", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.get(f"{base}/", timeout=30).status_code == 200  # the UI
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
        model = api.models.list().data[0].id  # the UI has loaded nothing yet: the default model is on disk
        reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.usage.completion_tokens >= 1
        assert httpx.get(f"{base}/health").json()["model"] == model  # the worker the UI uses has it loaded now
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    refused = run_localrun("ui", "--api", "--host", "0.0.0.0", "--auth", "a:b", env=env)
    assert refused.returncode == 2 and "api-key" in refused.stderr
    neither = run_localrun("ui", "--api", "--host", "0.0.0.0", env=env)  # both logins named at once
    assert neither.returncode == 2 and "--auth-file" in neither.stderr and "--api-key-file" in neither.stderr

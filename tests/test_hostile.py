"""Hostile requests against a real `localrun serve` (the default model, started from a file outside the store):
every one gets a JSON error within 2 s, the server answers a normal request after each, its memory stays
bounded, and a model process killed mid-request gives an error event and a properly ended stream."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.serve_support import start_server, stop

BOUND_S = 2.0
RSS_SLACK_BYTES = 200 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_gguf):
    """The server, its process, the id of its model and of a damaged model in its store, its RSS at rest."""
    home = tmp_path_factory.mktemp("home")
    corrupt = home / "models" / "evil" / "bad" / "bad.gguf"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"GGUF" + b"\xff" * 64)
    outside = tmp_path_factory.mktemp("elsewhere") / "outside.gguf"
    shutil.copyfile(default_gguf, outside)
    env = {**os.environ, "LOCALRUN_HOME": str(home)}
    env.pop("LOCALRUN_API_KEY", None)
    proc, base = start_server(str(outside), "--n-ctx", "1024", env=env)
    model = httpx.get(f"{base}/health").json()["model"]
    state = {"base": base, "proc": proc, "model": model, "corrupt": "evil/bad:bad.gguf", "home": str(home)}
    _chat(state, "hi", max_tokens=4)  # warm: the first generation's allocations are the normal size
    state["rss0"] = psutil.Process(proc.pid).memory_info().rss
    yield state
    stop(proc)


def _chat(served: dict, text: str, **extra: Any) -> httpx.Response:
    body = {"model": served["model"], "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}
    return httpx.post(f"{served['base']}/v1/chat/completions", json=body, timeout=60)


def _alive(served: dict) -> None:
    """The server still answers a normal request with a generation."""
    reply = _chat(served, "Say hi.", max_tokens=2)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] is not None


def _assert_error(reply: httpx.Response, status: int, elapsed_s: float) -> dict:
    assert reply.status_code == status, reply.text[:300]
    assert elapsed_s < BOUND_S, f"answered after {elapsed_s:.1f} s"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "/tmp/" not in error["message"] and os.path.expanduser("~") not in error["message"]
    return error


def _post(served: dict, content: bytes, headers: dict | None = None) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    reply = httpx.post(
        f"{served['base']}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
    )
    return reply, time.perf_counter() - t0


def _schema(schema: Any) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def _nested(depth: int) -> str:
    """A schema nested depth arrays deep, as JSON text (json.dumps itself would recurse too deep)."""
    return '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth


def _raw(extra: str) -> bytes:
    return ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], ' + extra + "}").encode()


def _tool(parameters: Any, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


_MSG = [{"role": "user", "content": "hi"}]
# (case id, extra body fields, status, words the message must contain)
BODY_CASES = [
    # rows 1-2: schema sizes, from the API
    ("maxLength-1e9", _schema({"type": "string", "maxLength": 10**9}), 400, "max-schema-length"),
    ("maxLength-1e8", _schema({"type": "string", "maxLength": 10**8}), 400, "max-schema-length"),
    ("maxLength-1e6", _schema({"type": "string", "maxLength": 10**6}), 400, "max-schema-length"),
    ("minLength-1e6", _schema({"type": "string", "minLength": 10**6}), 400, "max-schema-length"),
    (
        "maxItems-1e6",
        _schema({"type": "array", "items": {"type": "integer"}, "maxItems": 10**6}),
        400,
        "max-schema-items",
    ),
    ("minItems-1e7", _schema({"type": "array", "minItems": 10**7}), 400, "max-schema-items"),
    ("pattern-repeat-1e6", _schema({"type": "string", "pattern": "^a{1000000}$"}), 400, "max-schema-length"),
    ("pattern-range-1e5", _schema({"type": "string", "pattern": "^(ab){2,100000}$"}), 400, "max-schema-length"),
    ("pattern-open-1e6", _schema({"type": "string", "pattern": "^[a-z]{1000000,}$"}), 400, "max-schema-length"),
    (
        "nested-arrays-of-strings",
        _schema({"type": "array", "maxItems": 1000, "items": {"type": "string", "maxLength": 1000}}),
        200,
        "",
    ),
    # row 3: enum size, property count
    ("enum-100k", _schema({"enum": [f"v{i}" for i in range(100_000)]}), 400, "max-schema-enum"),
    ("enum-501", _schema({"enum": [f"v{i}" for i in range(501)]}), 400, "max-schema-enum"),
    (
        "properties-100k",
        _schema({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(100_000)}}),
        400,
        "max-schema-properties",
    ),
    (
        "many-small-objects",
        _schema(
            {
                "anyOf": [
                    {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(50)}}
                    for _ in range(20)
                ]
            }
        ),
        400,
        "max-schema-properties",
    ),
    # row 4: nesting in a schema and in tool parameters
    (
        "tool-parameters-huge-enum",
        {
            "tools": [_tool({"type": "object", "properties": {"a": {"enum": list(range(5000))}}})],
            "tool_choice": "required",
        },
        400,
        "max-schema-enum",
    ),
    ("tools-200", {"tools": [_tool({"type": "object"}, f"f{i}") for i in range(200)]}, 400, "max-tools"),
    # row 5: tool call arguments in the history
    (
        "tool-arguments-not-json",
        {
            "messages": [
                *_MSG,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "1"},
            ]
        },
        400,
        "arguments",
    ),
    (
        "tool-arguments-a-list",
        {
            "messages": [
                *_MSG,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}],
                },
            ]
        },
        400,
        "arguments",
    ),
    # row 6: what the grammar writer cannot express, and schemas nothing satisfies
    ("pattern-backreference", _schema({"type": "string", "pattern": "^(a)\\1$"}), 400, "backreference"),
    ("pattern-unbalanced", _schema({"type": "string", "pattern": "^(ab$"}), 400, "not a valid regular expression"),
    (
        "pattern-unbalanced-close",
        _schema({"type": "string", "pattern": "^ab)$"}),
        400,
        "not a valid regular expression",
    ),
    ("pattern-lookahead", _schema({"type": "string", "pattern": "^(?=a)a$"}), 400, "lookahead"),
    ("pattern-lookbehind", _schema({"type": "string", "pattern": "^a(?<!b)$"}), 400, "lookbehind"),
    ("pattern-word-boundary", _schema({"type": "string", "pattern": "^\\bword$"}), 400, "\\b"),
    ("pattern-lazy", _schema({"type": "string", "pattern": "^a+?$"}), 400, "lazy"),
    ("pattern-inner-anchor", _schema({"type": "string", "pattern": "^a^b$"}), 400, "'^'"),
    ("minLength-over-maxLength", _schema({"type": "string", "minLength": 5, "maxLength": 2}), 400, "minLength"),
    ("minItems-over-maxItems", _schema({"type": "array", "minItems": 5, "maxItems": 2}), 400, "minItems"),
    ("minimum-over-maximum", _schema({"type": "integer", "minimum": 5, "maximum": 2}), 400, "minimum"),
    ("empty-enum", _schema({"enum": []}), 400, "enum"),
    ("minProperties", _schema({"type": "object", "minProperties": 10**6}), 400, "minProperties"),
    ("maxLength-infinite", _schema({"type": "string", "maxLength": 1e300}), 400, "maxLength"),
    ("pattern-escapes-that-work", _schema({"type": "string", "pattern": "^\\d{2}\\.[\\w-]{1,3}$"}), 200, ""),
    # row 7: message count
    ("messages-50k", {"messages": [{"role": "user", "content": "x"}] * 50_000}, 400, "max-messages"),
    ("messages-1001", {"messages": [{"role": "user", "content": "x"}] * 1001}, 400, "max-messages"),
    # other fields
    ("stop-1e5-chars", {"stop": "x" * 100_000}, 400, "max-stop-chars"),
    ("stop-1000-strings", {"stop": ["x"] * 1000}, 400, "stop"),
    ("max-tokens-1e12", {"max_tokens": 10**12}, 400, "max_tokens"),
    ("temperature-a-string", {"temperature": "hot"}, 400, "temperature"),
    ("content-a-number", {"messages": [{"role": "user", "content": 12345}]}, 400, "messages"),
    ("model-a-list", {"model": ["a"]}, 400, "model"),
    ("stop-not-strings", {"stop": [1, 2]}, 400, "stop"),
    ("unknown-model", {"model": "../../etc/passwd"}, 404, "does not exist"),
    ("n-2", {"n": 2}, 400, "n"),
    # what already held before: keep it so
    ("bad-role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("ref-to-a-url", _schema({"$ref": "https://example.com/schema.json"}), 400, "schema"),
    ("ref-to-a-file", _schema({"$ref": "file:///etc/passwd"}), 400, "schema"),
    ("temperature-9", {"temperature": 9}, 400, "temperature"),
    ("bad-tool-name", {"tools": [_tool({"type": "object"}, "bad name!")]}, 400, "name"),
    ("unsupported-parameter", {"logit_bias": {"1": 5}}, 400, "logit_bias"),
    (
        "deep-text-in-a-string",
        {"messages": [{"role": "user", "content": "[" * 50_000}], "max_tokens": 1},
        400,
        "context",
    ),
]


@pytest.mark.parametrize(("extra", "status", "words"), [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES])
def test_hostile_bodies(served, extra, status, words):
    body = {"model": served["model"], "messages": _MSG, "max_tokens": 2, "temperature": 0, **extra}
    reply, elapsed = _post(served, json.dumps(body).encode())
    if status == 200:
        assert reply.status_code == 200, reply.text[:300]
    else:
        error = _assert_error(reply, status, elapsed)
        assert words.lower() in error["message"].lower()
    _alive(served)


RAW_CASES = [
    (
        "schema-nested-2000",
        _raw(
            '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ' + _nested(2000) + "}}"
        ),
        400,
        "max-json-depth",
    ),
    (
        "tool-parameters-nested-2000",
        _raw(
            '"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": '
            + _nested(2000)
            + "}}]"
        ),
        400,
        "max-json-depth",
    ),
    (
        "nested-body-100k",
        b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "max-json-depth",
    ),
    ("nested-body-2000", b'{"x": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}", 400, "max-json-depth"),
    ("unbalanced-brackets", b'{"messages": [[[[', 400, "not valid JSON"),
    ("unbalanced-deep-100k", b"[" * 100_000, 400, "max-json-depth"),  # the parser, not the scan, finds it
    ("unbalanced-deep-closed-wrong", b'{"a": ' + b"[" * 5_000 + b"}" * 5_000, 400, "max-json-depth"),
    ("nan", b'{"model": "m", "messages": [], "temperature": NaN}', 400, "NaN"),
    (
        "infinity-in-schema",
        b'{"model": "m", "messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": Infinity}}}}',
        400,
        "Infinity",
    ),
    ("invalid-utf8", b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not valid JSON"),
    ("binary", bytes(range(256)) * 16, 400, "not valid JSON"),
    ("empty", b"", 400, "not valid JSON"),
    ("not-an-object", b"[1, 2, 3]", 400, "JSON object"),
    ("huge-integer", b'{"model": "m", "messages": [], "max_tokens": ' + b"9" * 100_000 + b"}", 400, "not valid JSON"),
    (
        "body-5MB",
        b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}',
        413,
        "max-body-bytes",
    ),
]


@pytest.mark.parametrize(("raw", "status", "words"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_hostile_raw_bodies(served, raw, status, words):
    reply, elapsed = _post(served, raw)
    error = _assert_error(reply, status, elapsed)
    assert words.lower() in error["message"].lower()
    _alive(served)


def test_duplicate_keys_take_the_last_value(served):
    body = json.dumps({"model": served["model"], "messages": _MSG, "max_tokens": 2})
    raw = body[:-1] + ', "max_tokens": "many"}'
    reply, elapsed = _post(served, raw.encode())
    assert "max_tokens" in _assert_error(reply, 400, elapsed)["message"]
    _alive(served)


def test_compressed_body_is_refused(served):
    import gzip

    bomb = gzip.compress(b"[" * (10 << 20))
    reply, elapsed = _post(served, bomb, {"content-encoding": "gzip"})
    assert "Content-Encoding" in _assert_error(reply, 415, elapsed)["message"]
    _alive(served)


def _raw_request(served: dict, head: bytes, body: bytes) -> tuple[int, dict, float]:
    """Send a request over a plain socket (to lie about its length); the status and JSON of the answer."""
    port = int(served["base"].rsplit(":", 1)[1])
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    elapsed = time.perf_counter() - t0
    header, _, payload = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(payload[: _length(data)]), elapsed


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_a_200MB_body_is_refused_before_it_is_read(served):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 209715200\r\n\r\n"
    )
    status, body, elapsed = _raw_request(served, head, b'{"model": "' + b"x" * 65536)
    assert status == 413 and elapsed < BOUND_S
    assert "max-body-bytes" in body["error"]["message"]
    _alive(served)


def test_a_chunked_body_stops_at_the_limit(served):
    def chunks():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * (64 << 10)
        yield b'"}]}'

    t0 = time.perf_counter()
    reply = httpx.post(f"{served['base']}/v1/chat/completions", content=chunks(), timeout=60)
    _assert_error(reply, 413, time.perf_counter() - t0)
    _alive(served)


def test_content_length_shorter_than_the_body(served):
    body = json.dumps({"model": served["model"], "messages": _MSG}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
    )
    status, answer, elapsed = _raw_request(served, head, body)
    assert status == 400 and elapsed < BOUND_S and "not valid JSON" in answer["error"]["message"]
    _alive(served)


def test_ui_schema_field_uses_the_same_limits():
    from localrun.engine.structured import with_json_schema
    from localrun.errors import UserError
    from localrun.settings import SamplingParams

    for text in ('{"type": "string", "maxLength": 1000000000}', "[" * 5000 + "]" * 5000):
        t0 = time.perf_counter()
        with pytest.raises(UserError, match="limit"):
            with_json_schema(SamplingParams(), text)
        assert time.perf_counter() - t0 < BOUND_S


def test_corrupt_model_is_a_400_without_its_path(served):
    t0 = time.perf_counter()
    reply = httpx.get(f"{served['base']}/v1/models/{served['corrupt']}", timeout=30)
    error = _assert_error(reply, 400, time.perf_counter() - t0)
    assert served["home"] not in error["message"]
    body = {"model": served["corrupt"], "messages": _MSG, "max_tokens": 2}
    reply, elapsed = _post(served, json.dumps(body).encode())
    error = _assert_error(reply, 400, elapsed)
    assert served["home"] not in error["message"] and "bad.gguf" in error["message"]
    _alive(served)


def test_health_answers_while_a_grammar_is_built(served):
    """The grammar is built off the event loop: /health answers at once meanwhile."""
    body = {"model": served["model"], "messages": _MSG, "max_tokens": 1, **_schema(_props(400))}
    worker = threading.Thread(target=_post, args=(served, json.dumps(body).encode()))
    worker.start()
    t0 = time.perf_counter()
    while worker.is_alive():
        assert httpx.get(f"{served['base']}/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 60
    _alive(served)


def _props(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 50} for i in range(n)}}


def _model_process(served: dict) -> psutil.Process:
    kids = psutil.Process(served["proc"].pid).children(recursive=True)
    workers = [
        k for k in kids if "spawn_main" in " ".join(k.cmdline()) and "resource_tracker" not in " ".join(k.cmdline())
    ]
    assert len(workers) == 1, [k.cmdline() for k in kids]
    return workers[0]


def test_model_process_killed_mid_stream(served):
    """Rows 8 and 9: an error event, then [DONE]; the next request reloads the model from outside the store."""
    body = {"model": served["model"], "messages": _MSG, "max_tokens": 400, "ignore_eos": True, "stream": True}
    lines = []
    with httpx.stream("POST", f"{served['base']}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if len(lines) == 3:
                    _model_process(served).kill()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: ") :])["error"]
    assert error["type"] == "server_error" and "SIGKILL" in error["message"]
    assert "/tmp/" not in error["message"]
    _alive(served)


def test_model_process_killed_without_streaming(served):
    body = {"model": served["model"], "messages": _MSG, "max_tokens": 400, "ignore_eos": True}
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(reply=_post(served, json.dumps(body).encode())[0]))
    worker.start()
    deadline = time.monotonic() + 30
    while not httpx.get(f"{served['base']}/health").json()["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    _model_process(served).kill()
    worker.join(timeout=30)
    reply = out["reply"]
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "model_failed"
    _alive(served)
    models = httpx.get(f"{served['base']}/v1/models").json()["data"]
    assert models[0]["id"] == served["model"] and models[0]["loaded"]


def test_zz_memory_stays_bounded_and_faults_are_counted(served):
    """After every case above: the server process is within 200 MB of its size at rest."""
    rss = psutil.Process(served["proc"].pid).memory_info().rss
    print(f"server RSS at rest {served['rss0'] >> 20} MB, after the suite {rss >> 20} MB")
    assert rss <= served["rss0"] + RSS_SLACK_BYTES, f"{(rss - served['rss0']) >> 20} MB more than at rest"
    text = httpx.get(f"{served['base']}/metrics").text
    assert 'status="413"' in text and 'status="400"' in text and 'status="503"' in text
    os.set_blocking(served["proc"].stderr.fileno(), False)
    log = served["proc"].stderr.read() or ""
    assert "Traceback" not in log, log[-2000:]


def test_ui_delete_message_names_no_path(default_gguf):
    pytest.importorskip("gradio")
    from localrun.models.catalog import DEFAULT_MODEL_NAME
    from ui.tabs.models import delete

    status, _, _ = delete(DEFAULT_MODEL_NAME, True)
    assert "outside the model store" in status
    assert str(default_gguf.parent) not in status and os.path.expanduser("~") not in status


# -- the CLI ------------------------------------------------------------------------------------------


def _cli(*args: str, stdin: bytes = b"") -> tuple[int, str, float]:
    import subprocess
    import sys

    from tests.conftest import REPO

    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "localrun.cli", *args], input=stdin, capture_output=True, timeout=60, cwd=REPO
    )
    return done.returncode, done.stderr.decode(errors="replace"), time.perf_counter() - t0


def _one_sentence(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_cli_stdin_that_is_not_utf8(default_gguf):
    rc, err, _ = _cli("chat", str(default_gguf), "--max-tokens", "1", stdin=b"hello \xff\xfe\x00 binary")
    _one_sentence(rc, err, "not UTF-8", "byte 6")


def test_cli_n_threads_bounded_by_the_machine(default_gguf):
    rc, err, _ = _cli("chat", str(default_gguf), "--n-threads", "100000", "-p", "hi")
    _one_sentence(rc, err, "n_threads", str(os.cpu_count()))


@pytest.mark.parametrize(
    "command", [("chat", "{}", "-p", "hi"), ("models", "info", "{}"), ("models", "fit", "{}"), ("serve", "{}")]
)
def test_cli_refuses_a_fifo(tmp_path, command):
    fifo = tmp_path / "x.gguf"
    os.mkfifo(fifo)
    rc, err, elapsed = _cli(*[str(fifo) if a == "{}" else a for a in command])
    _one_sentence(rc, err, "not a regular file")
    assert elapsed < 30  # it never blocked on the open


def test_cli_pull_refuses_a_path_as_repo_name():
    rc, err, _ = _cli("pull", "../../x")
    _one_sentence(rc, err, "not a valid repo name")

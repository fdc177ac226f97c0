"""The web UI through its API (gradio_client) against a real `localrun ui` subprocess and the default model.

Covers every named endpoint: load, chat streaming with live metrics, stop, regenerate, clear, two clients at
once, a killed model process, the catalog with fit verdicts, model info, search/download/delete on a local
fake hub, and the system view. Reply text is not asserted (the default model's words are not the point here).
"""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hubserver import FakeHub, HubServer, _Handler

from localrun.format import fmt_bytes
from localrun.models.catalog import DEFAULT_MODEL_NAME, default_model_path

gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
HUB_REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
HUB_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STARTUP_S = 180  # generous: two cores shared with other test runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def localrun_command() -> list[str]:
    script = Path(sys.executable).with_name("localrun")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from localrun.cli import main; sys.exit(main())"]


@contextmanager
def run_ui(home: Path, *, hub_url: str = "http://127.0.0.1:9", args: tuple[str, ...] = ()) -> Iterator[str]:
    """`localrun ui` on a free port with its own model store; yields the URL, stops it with Ctrl-C."""
    port = free_port()
    env = {
        **os.environ,
        "LOCALRUN_HOME": str(home / "home"),
        "LOCALRUN_CHATS": str(home / "chats.sqlite"),  # each UI its own saved chats
        "HF_HUB_CACHE": str(home / "hf"),
        "HF_ENDPOINT": hub_url,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    env.pop("HF_TOKEN", None)
    log = (home / "ui.log").open("w")
    proc = subprocess.Popen(
        [*localrun_command(), "ui", "--port", str(port), *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"localrun ui exited with {proc.returncode}:\n{(home / 'ui.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"localrun ui did not answer in {STARTUP_S} s:\n{(home / 'ui.log').read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class _SlowHandler(_Handler):
    """Serves files in small timed chunks, so a download lasts long enough to report progress."""

    def _stream(self, entry: Any, start: int, drop_at: int | None) -> None:
        with entry.path.open("rb") as handle:
            handle.seek(start)
            while chunk := handle.read(8 << 20):
                self.wfile.write(chunk)
                time.sleep(0.15)


@pytest.fixture(scope="module")
def hub_server() -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(HUB_REPO, HUB_FILE, default_model_path())
    server = HubServer(fake)
    server.server.RequestHandlerClass = type("Slow", (_SlowHandler,), {"hub": fake})
    with server as running:
        yield running


@pytest.fixture(scope="module")
def ui_url(tmp_path_factory: pytest.TempPathFactory, hub_server: FakeHub) -> Iterator[str]:
    with run_ui(tmp_path_factory.mktemp("ui-api"), hub_url=hub_server.url) as url:
        yield url


@pytest.fixture(scope="module")
def client(ui_url: str) -> Any:
    return gradio_client.Client(ui_url, verbose=False)


# ---- helpers -----------------------------------------------------------------------------------------


def defaults(client: Any, api_name: str, **values: Any) -> dict[str, Any]:
    """Every parameter of an endpoint: the given values, None for optional numbers without a default."""
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]
    params = {p["parameter_name"]: None for p in endpoint["parameters"] if not p.get("parameter_has_default")}
    params.update(values)
    return params


def chat(client: Any, message: str, **settings: Any) -> Any:
    settings.setdefault("temperature", 0.0)
    return client.submit(api_name="/chat", **defaults(client, "/chat", message=message, **settings))


def assistant_text(chatbot: Any) -> str:
    """The last assistant message's text in a chatbot output (or '' for a skipped update)."""
    if not isinstance(chatbot, list) or not chatbot or chatbot[-1]["role"] != "assistant":
        return ""
    content = chatbot[-1]["content"]
    return "".join(part.get("text", "") for part in content) if isinstance(content, list) else str(content)


def metric(html: str, key: str) -> float:
    found = re.search(rf'id="m-{key}" data-value="([-0-9.e]+)"', html)
    assert found, f"no m-{key} value in {html[:300]}"
    return float(found.group(1))


def live_text(output: Any) -> str:
    """The streaming reply in an update (the last output, HTML-escaped plain text), or '' when skipped."""
    return html.unescape(output[-1]) if isinstance(output[-1], str) else ""


def wait_for_text(job: Any, *, timeout_s: float = 120) -> str:
    """Wait until a streamed update shows some reply text; returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for output in job.outputs():
            if text := live_text(output).strip():
                return text
        time.sleep(0.1)
    raise AssertionError("no reply text streamed in time")


def rows(table: Any) -> list[list[Any]]:
    return table["data"] if isinstance(table, dict) else []


# ---- tests --------------------------------------------------------------------------------------------


def test_every_endpoint_is_named(client: Any) -> None:
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    expected = {"/chat", "/regenerate", "/stop", "/clear", "/load_model", "/model_choices", "/catalog"}
    expected |= {"/model_info", "/hub_search", "/download", "/delete_model", "/local_models", "/system_info"}
    assert expected | {"/worker_status"} <= names
    assert not [n for n in names if n.startswith("/lambda")], names


def test_load_model_reports_progress_then_the_model(client: Any) -> None:
    job = client.submit(api_name="/load_model", **defaults(client, "/load_model", picker=DEFAULT_MODEL_NAME))
    job.result(timeout=180)
    statuses = job.outputs()  # the status line (the Load button's state is not part of the API)
    assert any("⏳" in s for s in statuses), statuses
    assert "Loaded smollm2-135m-instruct" in statuses[-1] and "llamacpp on cpu" in statuses[-1]
    status = client.predict(api_name="/worker_status")
    assert status["alive"] and status["model"] == DEFAULT_MODEL_NAME


def test_chat_streams_with_live_metrics(client: Any) -> None:
    # 256 tokens (seconds of streaming): the text updates a few times a second, so even a fast machine streams
    # it in several pieces
    job = chat(client, "Hello, who are you?", max_tokens=256, ignore_eos=True)
    chatbot, metrics, charts, table, status, _, live = job.result(timeout=480)
    partial = [t for t in dict.fromkeys(live_text(o) for o in job.outputs()) if t]
    assert len(partial) >= 2, partial  # the reply streamed in more than one piece
    final = assistant_text(chatbot)
    assert all(final.startswith(t) for t in partial)  # each piece extends the one before; the chat has it all
    assert live == ""  # the streaming text moved into the chat
    assert status.startswith("Done (length)"), status
    assert 0 < metric(metrics, "ttft") < 120
    assert 0 < metric(metrics, "decode-tps") < 10_000
    assert 0 < metric(metrics, "prompt-tps") < 1_000_000
    assert metric(metrics, "tokens") == 256
    assert metric(metrics, "ram") > 50e6  # the model process holds the weights
    for chart, line in (("rate", "average"), ("memory", "RAM")):  # each chart's axis tops its points
        top = float(re.search(rf'id="chart-{chart}" data-top="([\d.e+]+)"', charts).group(1))
        last = float(re.search(rf'data-series="{line}" data-points="\d+" data-last="([\d.e+]+)"', charts).group(1))
        assert 0 < last <= top
    assert rows(table)[-1][5] == 256 and rows(table)[-1][-1] == "length"
    assert "TTFT" in final and "tok/s" in final  # the stats line under the reply


def test_stop_mid_reply_then_regenerate(client: Any) -> None:
    job = chat(client, "Tell me a very long story.", max_tokens=4000, ignore_eos=True)
    wait_for_text(job)
    assert client.predict(api_name="/stop") == "Stopping…"
    _, metrics, _, table, status, *_ = job.result(timeout=120)
    assert status.startswith("Done (cancelled)"), status
    assert rows(table)[-1][-1] == "cancelled" and rows(table)[-1][5] < 4000

    job = client.submit(api_name="/regenerate", **defaults(client, "/regenerate", max_tokens=8, ignore_eos=True))
    chatbot, _, _, table, status, *_ = job.result(timeout=240)
    assert status.startswith("Done (length)"), status
    assert [row[-1] for row in rows(table)][-2:] == ["cancelled", "length"]  # every reply keeps its figures
    assert [m["role"] for m in chatbot] == ["user", "assistant"] * 2  # the stopped reply was replaced

    cleared = client.predict(api_name="/clear")
    assert cleared[0] == [] and rows(cleared[4]) == []
    job = client.submit(api_name="/regenerate", **defaults(client, "/regenerate"))
    assert "nothing to regenerate" in job.result(timeout=60)[4]


def test_two_clients_get_their_own_complete_replies(ui_url: str) -> None:
    clients = [gradio_client.Client(ui_url, verbose=False) for _ in range(2)]
    jobs = [chat(c, f"Message number {i}", max_tokens=16, ignore_eos=True) for i, c in enumerate(clients)]
    for i, job in enumerate(jobs):
        chatbot, _, _, table, status, *_ = job.result(timeout=300)
        assert status.startswith("Done (length)"), status
        assert [m["role"] for m in chatbot] == ["user", "assistant"]
        assert chatbot[0]["content"][0]["text"] == f"Message number {i}"
        assert [row[5] for row in rows(table)] == [16]  # one reply of 16 tokens, nothing from the other
        final = assistant_text(chatbot)
        streamed = [live_text(o) for o in job.outputs()[:-1]]
        assert all(final.startswith(t) for t in streamed if t)  # never the other's tokens


def test_killed_model_process_shows_an_error_and_recovers(ui_url: str) -> None:
    client = gradio_client.Client(ui_url, verbose=False)
    before = client.predict(api_name="/worker_status")
    job = chat(client, "Count to a thousand.", max_tokens=4000, ignore_eos=True)
    wait_for_text(job)
    os.kill(client.predict(api_name="/worker_status")["pid"], signal.SIGKILL)
    chatbot, _, _, _, status, *_ = job.result(timeout=120)
    assert "killed by SIGKILL" in status and "restarts" in status, status
    assert "interrupted" in assistant_text(chatbot)  # the partial reply stays, marked

    job = chat(client, "Are you back?", max_tokens=8, ignore_eos=True)
    _, metrics, _, _, status, *_ = job.result(timeout=240)
    assert status.startswith("Done (length)"), status
    assert metric(metrics, "tokens") == 8
    after = client.predict(api_name="/worker_status")
    assert after["alive"] and after["pid"] != before["pid"]
    assert after["crashes"] == before["crashes"] + 1 and after["model"] == DEFAULT_MODEL_NAME


def test_catalog_shows_fit_verdicts(client: Any) -> None:
    table = client.predict(n_ctx=None, kv_type="f16", api_name="/catalog")
    by_name = {row[0]: row for row in rows(table)}
    default = by_name[DEFAULT_MODEL_NAME]
    assert default[7] == "yes"
    assert re.match(r"(CPU only|fits on GPU|partial offload)", default[8]), default[8]
    assert all(row[8] for row in by_name.values())  # every model has a verdict, downloaded or not


def test_model_info(client: Any) -> None:
    table, status = client.predict(spec=DEFAULT_MODEL_NAME, n_ctx=2048, kv_type="f16", api_name="/model_info")
    info = dict(rows(table))
    assert info["architecture"] == "llama" and info["quant type"] == "Q4_1"
    assert "memory at 2048 ctx (f16 KV)" in info
    table, status = client.predict(spec="no-such-model", n_ctx=None, kv_type="f16", api_name="/model_info")
    assert status.startswith("⚠️") and "Unknown model" in status


def test_search_download_and_delete(client: Any, hub_server: FakeHub) -> None:
    results, spec, status = client.predict(query="smollm2", api_name="/hub_search")
    assert rows(results)[0][0] == HUB_REPO, status
    job = client.submit(spec=f"{HUB_REPO}:{HUB_FILE}", api_name="/download")
    job.result(timeout=240)
    lines = [o[0] for o in job.outputs()]
    assert any(re.search(r"Downloading .*: \d+% of", line) for line in lines), lines
    assert lines[-1].startswith("Downloaded"), lines[-1]
    local, _ = client.predict(api_name="/local_models")
    names = [row[0] for row in rows(local)]
    stored = next(n for n in names if n != DEFAULT_MODEL_NAME)

    status, _, _ = client.predict(spec=stored, confirm=False, api_name="/delete_model")
    assert "I am sure" in status
    status, local, _ = client.predict(spec=stored, confirm=True, api_name="/delete_model")
    assert status.startswith("Deleted"), status
    assert [row[0] for row in rows(local)] == [DEFAULT_MODEL_NAME]
    status, _, _ = client.predict(spec=DEFAULT_MODEL_NAME, confirm=True, api_name="/delete_model")
    assert "outside the model store" in status  # the shipped default model is never deleted


def test_system_view(client: Any) -> None:
    import psutil

    from localrun.hardware import probe_cpu

    table = client.predict(api_name="/system_info")
    values = {(row[0], row[1]): row[2] for row in rows(table)}
    assert values[("devices", "CPU 0")] == probe_cpu().name
    assert values[("memory", "RAM total")] == fmt_bytes(psutil.virtual_memory().total)
    assert values[("llama.cpp", "built with")]
    assert values[("versions", "gradio")] != "not installed"
    assert values[("model process", "pid")].isdigit()


def test_mistakes_show_one_sentence_and_keep_the_model(client: Any) -> None:
    job = client.submit(api_name="/load_model", **defaults(client, "/load_model", picker="/no/such/model.gguf"))
    job.result(timeout=120)
    status = job.outputs()[-1]
    assert status.startswith("⚠️ Could not load /no/such/model.gguf") and "\n" not in status.strip(), status
    assert client.predict(api_name="/worker_status")["model"] == DEFAULT_MODEL_NAME
    status = chat(client, "Hi", n_ctx="lots").result(timeout=60)[4]
    assert status.startswith("⚠️") and "whole number" in status
    status = chat(client, "   ").result(timeout=60)[4]
    assert status == "Type a message first."

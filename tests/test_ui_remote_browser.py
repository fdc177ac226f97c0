"""A remote engine in the web UI, in headless Chromium: `localrun ui` drives a real `localrun serve` on loopback
(the default model, behind an API key) through the remote backend.

A wrong key is one sentence and the key is never on the page; a loaded remote answers and the load line names the
engine; when the engine goes away the error is one sentence, the earlier turn and the unsent message stay, and once
the engine is back the same conversation goes on.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_ui_api import run_ui
from test_ui_browser import CHROMIUM, TIMEOUT_MS, set_number, status_is

from localrun.errors import UserError
from localrun.settings import LoadOptions
from tests.serve_support import KEY, N_CTX, free_port, start_server, stop
from ui.controls import form_load_options, visible_fields
from ui.store import allowed_load

pytestmark = pytest.mark.browser
WRONG_KEY = "not-the-key-9f3e"
FIRST = "What is the capital of France?"
SECOND = "And what is the capital of Italy?"


@dataclass
class Engine:
    """`localrun serve` with an API key on a fixed loopback port, so it can be stopped and started again."""

    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        env = {**os.environ, "LOCALRUN_API_KEY": KEY}
        self.proc, _ = start_server("--n-ctx", str(N_CTX), env=env, port=self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(free_port())
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    (folder / "right").write_text(KEY + "\n")
    (folder / "wrong").write_text(WRONG_KEY + "\n")
    return {"right": folder / "right", "wrong": folder / "wrong"}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with run_ui(tmp_path_factory.mktemp("ui-remote")) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_function("document.querySelector('#load-status')?.innerText.includes('No model loaded')")
        yield page
        browser.close()


# Records every text an element shows from now on (its last outcome is still there when a new one starts).
WATCH_JS = """sel => {
  window.__watch?.disconnect();
  window.__seen = [];
  const el = document.querySelector(sel);
  window.__watch = new MutationObserver(() => window.__seen.push(el.innerText.trim()));
  window.__watch.observe(el, {subtree: true, childList: true, characterData: true});
}"""
ENDED_JS = "done => window.__seen.some(t => done.some(d => t.includes(d)))"


def outcome(page: Any, markdown: str, press: Any, done: tuple[str, ...]) -> str:
    """Do press(), then wait until the Markdown element shows one of the done texts; its text then (the text
    alone: Gradio's progress timer sits beside it)."""
    text = f"{markdown} [data-testid=markdown]"
    page.evaluate(WATCH_JS, text)
    press()
    page.wait_for_function(ENDED_JS, arg=list(done))
    return page.inner_text(text).strip()


def load_says(page: Any, key_file: Path, url: str) -> str:
    """Fill in the remote's address and key file, press Load; the load line once it settles."""
    page.fill("#set-url textarea", url)
    page.fill("#set-remote_api_key_file textarea", str(key_file))
    return outcome(page, "#load-status", lambda: page.click("#load-btn"), ("Loaded", "⚠️"))


def send(page: Any, text: str | None = None) -> str:
    """Send a message (None: what the box holds), wait until the turn ends, well or not; its status line."""
    if text is not None:
        page.fill("#chat-input textarea", text)
    press = lambda: page.press("#chat-input textarea", "Enter")  # noqa: E731
    return outcome(page, "#chat-status", press, ("Done", "⚠️"))


def messages(page: Any) -> list[tuple[str, str]]:
    """The chat as (role, text) pairs."""
    rows = page.locator("#chatbot [data-testid=user], #chatbot [data-testid=bot]")
    return [(rows.nth(i).get_attribute("data-testid"), rows.nth(i).inner_text()) for i in range(rows.count())]


def prompt_tokens(stats: str) -> int:
    new, cached = re.search(r"(\d+) (?:new )?prompt tokens?(?: \((\d+) cached\))?", stats).groups()
    return int(new) + int(cached or 0)


def assert_no_traceback(page: Any) -> None:
    text = page.inner_text("body")
    assert "Traceback" not in text and "Error:" not in text, text[-2000:]


def test_a_wrong_key_is_one_sentence_and_never_shown(page: Any, engine: Engine, keys: dict[str, Path]) -> None:
    page.click("#load-options button")  # open the accordion
    page.click("#set-backend input")
    page.get_by_role("option", name="remote engine").click()
    page.locator("#set-url").wait_for(state="visible")
    assert page.locator("#set-n_gpu_layers").is_hidden() and page.locator("#set-n_ctx").is_hidden()
    assert page.input_value("#model-picker input") == ""  # blank: the engine's first model
    says = load_says(page, keys["wrong"], engine.url)
    assert says.startswith("⚠️ Could not load the remote engine's first model: The remote engine refused the API key")
    content = page.content()
    assert WRONG_KEY not in content and KEY not in content
    assert_no_traceback(page)


def test_a_remote_engine_loads_and_answers(page: Any, engine: Engine, keys: dict[str, Path]) -> None:
    says = load_says(page, keys["right"], engine.url)
    assert says.startswith("Loaded smollm2-135m-instruct"), says  # the engine's first model, by its name
    assert "remote on localrun at 127.0.0.1" in says and "engine localrun" in says and "round trip" in says
    page.click("#sampling-options button")
    set_number(page, "set-max_tokens", 24)
    send(page, FIRST)
    status_is(page, "Done")
    [(_, asked), (_, reply)] = messages(page)
    assert asked == FIRST and reply.split("TTFT")[0].strip()  # a reply, with its stats line under it
    assert "remote/localrun" in reply
    assert page.inner_text("#m-vram") == "n/a (remote)"  # a localrun engine reports RAM but, here, no GPU
    assert KEY not in page.content()


def test_the_conversation_stays_when_the_engine_goes_away(page: Any, engine: Engine) -> None:
    before = messages(page)
    engine.stop()
    status = send(page, SECOND)
    assert status.startswith("⚠️") and f"Nothing answers at {engine.url}" in status, status
    assert "\n" not in status.strip()
    assert_no_traceback(page)
    assert messages(page) == before  # the first turn is still there
    assert page.input_value("#chat-input textarea") == SECOND  # the failed message is back in the box


def test_the_same_conversation_goes_on_once_the_engine_is_back(page: Any, engine: Engine) -> None:
    engine.start()
    send(page)  # what the box kept
    status_is(page, "Done")
    chat = messages(page)
    assert [role for role, _ in chat] == ["user", "bot", "user", "bot"] and chat[2][1] == SECOND
    first, second = page.locator("#chatbot .lr-stats").all_inner_texts()
    # the engine was sent the whole conversation: the first turn's prompt and reply are in the second's prompt
    first_reply_tokens = int(re.search(r"· (\d+) tok ·", first).group(1))
    assert prompt_tokens(second) > prompt_tokens(first) + first_reply_tokens // 2, (first, second)


def test_an_unknown_model_is_one_sentence_and_the_conversation_stays(page: Any, engine: Engine) -> None:
    before = messages(page)
    pick(page, "no-such-model")
    status = send(page, "One more question?")
    assert status.startswith(f"⚠️ The remote engine at {engine.url} has no model 'no-such-model'"), status
    assert "smollm2-135m-instruct" in status  # what it does serve
    assert_no_traceback(page)
    assert messages(page) == before and page.input_value("#chat-input textarea") == "One more question?"
    pick(page, "")  # the engine's first model again: it loads with the message, and the conversation goes on
    set_number(page, "set-max_tokens", 24)  # a new model starts from the defaults
    assert send(page).startswith("Done")
    assert [role for role, _ in messages(page)] == ["user", "bot"] * 3


def pick(page: Any, model: str) -> None:
    box = page.locator("#model-picker input")
    box.fill(model)
    box.press("Enter")
    page.wait_for_function("v => document.querySelector('#model-picker input').value === v", arg=model)


# The rules behind the page, without a browser.


def test_a_hidden_remote_address_does_not_turn_a_local_load_remote() -> None:
    left = {"url": "http://127.0.0.1:9/v1", "remote_api_key_file": "/keys/k"}
    local = form_load_options({"backend": "auto", **left}, "gguf")  # the URL is hidden for a local GGUF
    assert local.url is None and local.remote_api_key_file is None
    assert form_load_options({"backend": "remote", **left}, None).url == left["url"]
    assert form_load_options({"backend": "auto", **left}, None).url == left["url"]  # unknown model: all shown
    shown = visible_fields("remote", "gguf")
    assert shown["url"] and shown["remote_api_key_file"] and shown["backend"]
    assert not shown["n_ctx"] and not shown["device"] and not shown["draft"] and not shown["n_gpu_layers"]


def test_over_the_network_the_ui_reads_no_key_file() -> None:
    keyed = LoadOptions(backend="remote", url="http://127.0.0.1:9/v1", remote_api_key_file="/etc/hostname")
    with pytest.raises(UserError, match="only in a UI served on loopback"):
        allowed_load("any-remote-model", keyed, loopback=False)
    allowed_load("any-remote-model", keyed, loopback=True)
    allowed_load("any-remote-model", keyed.replace(remote_api_key_file=None), loopback=False)  # a name there
    with pytest.raises(UserError, match="over the network"):
        allowed_load("/etc/hostname", LoadOptions(), loopback=False)  # a local path, as before

"""Saved chats in the web UI, in headless Chromium: two users, a reload, rename, delete with undo, and a server
killed in the middle of a reply (every finished turn stays in the store)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ui_api import run_ui
from test_ui_browser import CHROMIUM, TIMEOUT_MS, set_number, status_is

from localrun.chats import ChatStore

pytestmark = pytest.mark.browser
USERS = {"alice": "pw-alice", "bob": "pw-bob"}


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Any]]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    home = tmp_path_factory.mktemp("ui-chats")
    logins = home / "logins"
    logins.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    with run_ui(home, args=("--auth-file", str(logins))) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield url, home, browser
        browser.close()


def _login(browser: Any, url: str, user: str) -> Any:
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.fill("input[data-testid=textbox]", user)
    page.fill("input[data-testid=password]", USERS[user])
    page.click("button.primary")
    page.wait_for_selector("#chat-list")
    page.wait_for_function(
        "!(document.querySelector('#load-status')?.innerText || 'Connecting').includes('Connecting')"
    )
    return page


def _send(page: Any, text: str) -> None:
    """Send a message and wait for its reply's stats line (the status still reads Done from the last one)."""
    replies = page.locator("#chatbot .lr-stats").count()
    page.fill("#chat-input textarea", text)
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function("n => document.querySelectorAll('#chatbot .lr-stats').length > n", arg=replies)
    status_is(page, "Done")


def _listed(page: Any) -> str:
    return page.inner_text("#chat-list")


def _wait_listed(page: Any, text: str, *, present: bool = True) -> None:
    page.wait_for_function(
        "([t, present]) => document.querySelector('#chat-list').innerText.includes(t) === present",
        arg=[text, present],
    )


def test_chats_survive_a_reload_rename_delete_undo_and_stay_per_user(ui: tuple) -> None:
    url, home, browser = ui
    page = _login(browser, url, "alice")
    page.click("#sampling-options button")
    set_number(page, "set-max_tokens", 24)
    page.fill("#set-temperature input[type=number]", "0")
    page.press("#set-temperature input[type=number]", "Tab")
    _send(page, "What is the capital of France?")
    _send(page, "And of Italy?")
    _wait_listed(page, "What is the capital of France?")

    page.reload()
    page.wait_for_selector("#chat-list")
    _wait_listed(page, "What is the capital of France?")
    page.wait_for_function("document.querySelectorAll('#chatbot .lr-stats').length === 2")
    assert "TTFT" in page.inner_text("#chatbot")  # each reply's stats line came back with it
    assert page.locator("#turns-table .virtual-row").count() >= 2  # and the turns table

    page.fill("#chat-title textarea, #chat-title input", "Capitals of Europe")
    page.click("#rename-chat-btn")
    _wait_listed(page, "Capitals of Europe")

    page.click("#delete-chat-btn")
    _wait_listed(page, "Capitals of Europe", present=False)
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")
    page.click("#undo-delete-btn")
    _wait_listed(page, "Capitals of Europe")
    page.wait_for_function("document.querySelectorAll('#chatbot .lr-stats').length === 2")

    page.click("#replay-chat-btn")  # the saved turns again, on the model process, with their settings and seeds
    page.wait_for_function("document.querySelector('#chats-status').innerText.includes('Replayed:')")
    report = page.inner_text("#chats-status")
    assert "Reply 1" in report and "Reply 2" in report and "TTFT" in report, report
    assert "Replayed: 2 of 2 replies identical" in report, report

    other = _login(browser, url, "bob")
    assert "Capitals" not in _listed(other) and "France" not in other.inner_text("#chatbot")
    other.context.close()

    store = ChatStore(home / "chats.sqlite")
    [chat] = store.list(owner="alice")
    assert chat.title == "Capitals of Europe" and chat.messages == 4 and store.list(owner="bob") == []
    page.context.close()


def test_killing_the_server_mid_reply_keeps_every_finished_turn(ui: tuple) -> None:
    url, home, browser = ui
    page = _login(browser, url, "alice")
    page.click("#sampling-options button")
    set_number(page, "set-max_tokens", 400)
    page.check("#set-ignore_eos input")
    store = ChatStore(home / "chats.sqlite")
    [chat] = store.list(owner="alice")  # the first test's chat, reopened on login
    page.fill("#chat-input textarea", "Write a long story about a lighthouse keeper.")
    page.press("#chat-input textarea", "Enter")
    status_is(page, "Generating")
    server = _ui_pid(home)
    os.kill(server, signal.SIGKILL)
    page.context.close()
    after = ChatStore(home / "chats.sqlite")
    assert [c.id for c in after.list(owner="alice")] == [chat.id]
    assert len(after.messages(chat.id)) == 4  # both finished turns; the cut reply was never half-written


def _ui_pid(home: Path) -> int:
    """The pid of the `localrun ui` process serving this home (run_ui writes its log there)."""
    import psutil

    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if " ui --port" in cmd and env.get("LOCALRUN_CHATS") == str(home / "chats.sqlite"):
            return proc.pid
    raise AssertionError("the UI server process was not found")

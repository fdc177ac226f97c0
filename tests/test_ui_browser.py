"""End to end in headless Chromium: `localrun ui` as a subprocess, driven through Playwright.

Loads the default model, watches a reply stream in, reads TTFT and tokens/s off the live panel, stops a
reply, regenerates, then checks the Models and System tabs. Screenshots go to test-artifacts/; with
LOCALRUN_README_SCREENSHOT=1 the chat screenshot also replaces ui/screenshot-chat.png.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ui_api import run_ui

from localrun.format import fmt_bytes

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 240_000  # two shared cores: loading and replies can be slow

# Records every text the streaming reply shows (#live-reply while it streams, then the chat's last reply), so
# the test can see the reply arrive in pieces.
RECORD_JS = """() => {
  window.__replies = [];
  const grab = () => {
    const live = document.querySelector('#live-reply .lr-text');
    const msgs = document.querySelectorAll('#chatbot [data-testid=bot]');
    const text = live && live.innerText.trim() ? live.innerText : msgs.length ? msgs[msgs.length - 1].innerText : '';
    if (window.__replies[window.__replies.length - 1] !== text) window.__replies.push(text);
  };
  for (const sel of ['#chatbot', '#live-reply']) {
    new MutationObserver(grab).observe(document.querySelector(sel), {subtree: true, childList: true, characterData: true});
  }
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with run_ui(tmp_path_factory.mktemp("ui-browser")) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_function("document.querySelector('#load-status')?.innerText.includes('No model loaded')")
        yield page
        browser.close()


def status_is(page: Any, prefix: str) -> None:
    page.wait_for_function(
        "p => document.querySelector('#chat-status').innerText.trim().startsWith(p)", arg=prefix, timeout=TIMEOUT_MS
    )


def set_number(page: Any, elem_id: str, value: int) -> None:
    """Type a number; retry if a late UI update (e.g. the model's recommended settings) overwrote it."""
    box = page.locator(f"#{elem_id} input")
    check = "([sel, v]) => document.querySelector(sel).value === v"
    for _ in range(5):
        box.fill(str(value))
        box.press("Tab")
        try:
            page.wait_for_function(check, arg=[f"#{elem_id} input", str(value)], timeout=5_000)
            page.wait_for_timeout(500)
            if box.input_value() == str(value):
                return
        except Exception:  # playwright's TimeoutError: try typing it again
            continue
    raise AssertionError(f"#{elem_id} would not keep the value {value}")


def value_of(page: Any, key: str) -> float:
    return float(page.get_attribute(f"#m-{key}", "data-value"))


def turn_finishes(page: Any) -> list[str]:
    rows = page.locator("#turns-table .virtual-row").all_inner_texts()
    return [re.split(r"\s+", r.strip())[-1] for r in rows if r.strip()]


def shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_chat_streams_with_live_metrics(page: Any) -> None:
    page.click("#load-btn")
    page.wait_for_function("document.querySelector('#load-status').innerText.includes('Loaded smollm2')")
    page.click("#sampling-options button")  # open the accordion
    assert "recommended settings" in page.inner_text("#recommended-note")
    assert page.input_value("#system-prompt textarea")  # the default model's recommended system prompt
    set_number(page, "set-max_tokens", 80)  # the text updates a few times a second: enough for several pieces
    page.check("#set-ignore_eos input")
    page.evaluate(RECORD_JS)
    page.fill("#chat-input textarea", "Hello! What can you do?")
    page.press("#chat-input textarea", "Shift+Enter")  # a new line, not a send
    page.type("#chat-input textarea", "Tell me.")
    assert page.input_value("#chat-input textarea") == "Hello! What can you do?\nTell me."
    page.press("#chat-input textarea", "Enter")  # sends
    status_is(page, "Done")
    assert page.input_value("#chat-input textarea") == ""  # Enter sent it
    replies = [r.replace("▍", "").strip() for r in page.evaluate("window.__replies")]
    partial = [r for r in dict.fromkeys(replies) if r and r != "…" and "TTFT" not in r]
    assert len(partial) >= 2, replies  # the reply arrived in more than one update

    assert 0 < value_of(page, "ttft") < 120
    assert re.fullmatch(r"\d+ ms", page.inner_text("#m-ttft"))
    assert 0 < value_of(page, "decode-tps") < 10_000
    assert re.fullmatch(r"[\d.]+ tok/s", page.inner_text("#m-decode-tps"))
    assert value_of(page, "tokens") == 80
    assert "TTFT" in page.locator("#chatbot [data-testid=bot]").last.inner_text()  # stats line under the reply
    assert turn_finishes(page) == ["length"]
    path = shot(page, "chat")
    assert path.stat().st_size > 10_000
    if os.environ.get("LOCALRUN_README_SCREENSHOT") == "1":
        readme_screenshot(page)


def readme_screenshot(page: Any) -> None:
    """A plain question answered to its natural end, settings folded away: ui/screenshot-chat.png."""
    page.click("#clear-btn")  # the test's own turn (EOS ignored) would run on past its answer
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")
    page.uncheck("#set-ignore_eos input")
    set_number(page, "set-max_tokens", 200)
    page.fill("#chat-input textarea", "Give me three tips for better sleep.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(  # the reply with its stats line (the status line may still say the last "Done")
        "[...document.querySelectorAll('#chatbot [data-testid=bot]')].some(b => b.innerText.includes('TTFT'))"
    )
    status_is(page, "Done")
    page.click("#sampling-options button")
    page.locator("#set-max_tokens").wait_for(state="hidden")
    page.locator("#tab-chat").screenshot(path=str(ROOT / "ui" / "screenshot-chat.png"))
    page.click("#clear-btn")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")
    page.click("#sampling-options button")
    page.check("#set-ignore_eos input")


def test_stop_mid_reply_then_regenerate(page: Any) -> None:
    before = turn_finishes(page)
    set_number(page, "set-max_tokens", 4000)
    page.evaluate(RECORD_JS)
    page.fill("#chat-input textarea", "Tell me a very long story.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(
        "() => window.__replies.some(t => t.replace('▍', '').trim().length > 3 && !t.includes('TTFT'))"
    )
    page.click("#stop-btn")
    status_is(page, "Done (cancelled)")
    assert turn_finishes(page) == [*before, "cancelled"]
    assert value_of(page, "tokens") < 4000

    set_number(page, "set-max_tokens", 16)
    page.click("#regen-btn")
    status_is(page, "Done (length)")
    assert turn_finishes(page) == [*before, "cancelled", "length"]  # every reply keeps its figures
    assert value_of(page, "tokens") == 16
    # The same prompt again: the KV cache holds it, and the panel says so instead of showing a rate.
    prompt_card = page.locator("#live-metrics .lr-card", has=page.locator("#m-prompt-tps")).inner_text()
    assert re.search(r"\d+ new tokens?\s+\d+ cached", prompt_card), prompt_card
    # The stopped reply was replaced, not kept beside the new one.
    users = page.locator("#chatbot [data-testid=user]").count()
    assert users >= 1 and page.locator("#chatbot [data-testid=bot]").count() == users
    shot(page, "chat-regenerated")


def test_models_tab_shows_fit_and_info(page: Any) -> None:
    page.click("#tab-models-button")
    row = page.locator("#catalog-table .virtual-row", has_text="smollm2-135m-instruct").first
    row.wait_for()
    assert re.search(r"CPU only|fits on GPU|partial offload", row.inner_text()), row.inner_text()
    page.click("#info-btn")
    page.wait_for_function("document.querySelector('#model-info').innerText.includes('architecture')")
    info = page.inner_text("#model-info")
    assert "llama" in info and "Q4_1" in info and "fit verdict" in info
    shot(page, "models")


def test_system_tab_shows_this_machine(page: Any) -> None:
    import psutil

    from localrun.hardware import probe_cpu

    page.click("#tab-system-button")
    page.wait_for_function("document.querySelector('#system-table').innerText.includes('RAM total')")
    text = page.inner_text("#system-table")
    assert probe_cpu().name in text
    assert fmt_bytes(psutil.virtual_memory().total) in text
    assert "llama.cpp" in text
    shot(page, "system")


# Records the live panel's state and draft acceptance at every change (the panel updates while tokens stream).
RECORD_METRICS_JS = """() => {
  window.__panel = [];
  const record = () => {  // the panel is looked up afresh each time: Gradio may replace its element
    const panel = document.querySelector('#live-metrics');
    const state = panel?.querySelector('.lr-metrics')?.dataset.state;
    const acceptance = panel?.querySelector('#m-acceptance');
    const entry = [state, acceptance ? acceptance.dataset.value : null];
    const last = window.__panel[window.__panel.length - 1];
    if (!last || last[0] !== entry[0] || last[1] !== entry[1]) window.__panel.push(entry);
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def open_accordion(page: Any, accordion: str, inside: str) -> None:
    if not page.locator(inside).is_visible():
        page.click(f"{accordion} button")
    page.locator(inside).wait_for(state="visible")


def test_draft_model_shows_acceptance_live(page: Any) -> None:
    """The default model drafting for itself, picked in the draft picker: acceptance in the live panel while
    the reply streams, then in the reply's footer and the turns table; lookup and a draft together are refused."""
    page.click("#tab-chat-button")
    open_accordion(page, "#load-options", "#set-draft")
    draft = page.locator("#set-draft input")
    draft.fill("smollm2-135m-instruct")
    draft.press("Enter")
    page.click("#load-btn")
    page.wait_for_function(
        "() => /Loaded .*draft/.test(document.querySelector('#load-status').innerText)", timeout=TIMEOUT_MS
    )
    open_accordion(page, "#sampling-options", "#set-max_tokens")
    set_number(page, "set-max_tokens", 256)  # a few seconds of streaming: several live panel updates
    page.check("#set-ignore_eos input")
    page.click("#clear-btn")  # the status line would still say the last reply's "Done"
    page.wait_for_function("document.querySelector('#chat-status').innerText.trim() === ''")
    page.evaluate(RECORD_METRICS_JS)
    page.fill("#chat-input textarea", "Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons.")
    page.press("#chat-input textarea", "Enter")
    status_is(page, "Done")
    panel = page.evaluate("window.__panel")
    live = [float(v) for state, v in panel if state == "generating" and v is not None]
    assert live and all(0 <= v <= 1 for v in live), panel  # acceptance shown while tokens streamed
    assert 0 < value_of(page, "acceptance") <= 1
    assert re.search(r"\d+ of \d+ drafted", page.inner_text("#live-metrics"))
    assert "draft accepted" in page.locator("#chatbot [data-testid=bot]").last.inner_text()
    last_row = page.locator("#turns-table .virtual-row").last.inner_text()
    assert re.search(r"\d+% · \d+ of \d+", last_row), last_row
    shot(page, "chat-draft")

    page.check("#set-lookup input")  # a draft model and prompt lookup at once: one sentence, no load
    page.click("#load-btn")
    page.wait_for_function("document.querySelector('#load-status').innerText.includes('Choose one way of drafting')")
    page.uncheck("#set-lookup input")
    draft.fill("")
    draft.press("Enter")


# Counts the animation frames the page asks for; installed before the page's own scripts run.
FRAMES_JS = """
window.__frames = 0;
const raf = window.requestAnimationFrame.bind(window);
window.requestAnimationFrame = (cb) => { window.__frames++; return raf(cb); };
"""


def test_idle_page_asks_for_few_frames(page: Any) -> None:
    """Gradio's status tracker leaves a timer loop drawing 60 frames a second on an idle page (CPU taken from the
    model); the page's head script (ui/pagefix.py) lets it tick 4 times a second (~15 frames a second in all)."""
    context = page.context.browser.new_context()
    context.add_init_script(FRAMES_JS)
    idle = context.new_page()
    try:
        idle.goto(page.url)
        connected = "() => /oaded/.test(document.querySelector('#load-status')?.innerText ?? '')"
        idle.wait_for_function(connected, polling=250)  # "Loaded …" or "No model loaded yet…"
        idle.wait_for_timeout(3_000)  # past the page's opening transitions
        before = idle.evaluate("window.__frames")
        idle.wait_for_timeout(3_000)
        frames_per_s = (idle.evaluate("window.__frames") - before) / 3
    finally:
        context.close()
    assert frames_per_s < 30, f"{frames_per_s:.0f} animation frames a second on an idle page"

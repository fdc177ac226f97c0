"""A thinking model in the web UI, in headless Chromium: its thinking streams live in an open "Thinking" block
above the answer, then the reply keeps it folded with its token count and time, and the turns table counts
the thinking tokens. The model is the default one with a DeepSeek-R1-kind template (tests/test_reasoning.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_reasoning import R1_KIND, _with_template
from test_ui_api import run_ui
from test_ui_browser import CHROMIUM, TIMEOUT_MS, open_accordion, set_number, shot, status_is

pytestmark = pytest.mark.browser

# Every state of the live reply while it streams: whether it shows a Thinking block, and its title.
RECORD_JS = """() => {
  window.__thinking = [];
  const grab = () => {
    const title = document.querySelector('#live-reply details.lr-thinking summary');
    const entry = title ? title.innerText : '';
    if (window.__thinking[window.__thinking.length - 1] !== entry) window.__thinking.push(entry);
  };
  new MutationObserver(grab).observe(document.querySelector('#live-reply'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def page(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    model = _with_template(default_gguf, tmp_path_factory, "smollm2-r1-kind", R1_KIND)
    with (
        run_ui(tmp_path_factory.mktemp("ui-thinking"), args=("--model", str(model))) as url,
        sync_api.sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_function("document.querySelector('#load-status')?.innerText.length > 0")
        yield page
        browser.close()


def test_thinking_block_streams_then_folds(page: Any) -> None:
    page.click("#load-btn")
    page.wait_for_function("document.querySelector('#load-status').innerText.includes('Loaded')")
    open_accordion(page, "#sampling-options", "#set-max_tokens")
    set_number(page, "set-max_tokens", 160)
    for elem_id, value in (("set-seed", "1"), ("set-think_budget", "96")):  # blank-able numbers are text boxes
        box = page.locator(f"#{elem_id} textarea")
        box.fill(value)
        box.press("Tab")
        assert box.input_value() == value
    # 96 tokens of thinking: some seconds, several live updates of the block
    page.evaluate(RECORD_JS)
    page.fill("#chat-input textarea", "Explain step by step why the sky looks blue in the daytime.")
    page.press("#chat-input textarea", "Enter")
    status_is(page, "Done")
    live = [t for t in page.evaluate("window.__thinking") if t]
    assert live and all(t.startswith("Thinking · ") for t in live), live  # the block showed while it streamed
    reply = page.locator("#chatbot [data-testid=bot]").last
    title = reply.locator("details summary").inner_text()
    assert re.fullmatch(r"Thinking · 96 tok / [\d.]+ s \(cut by the budget\)", title), title
    assert reply.locator("details").get_attribute("open") is None  # folded once the reply is done
    answer = reply.inner_text()
    assert "</think>" not in answer and "thought 96 tok" in answer  # the stats line under it
    last_row = page.locator("#turns-table .virtual-row").last.inner_text()
    assert re.search(r"\b96\b", last_row), last_row
    shot(page, "chat-thinking")

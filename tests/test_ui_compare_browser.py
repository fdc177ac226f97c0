"""The Compare tab in headless Chromium: a two-variant arena streams both answers, then a quality run
fills the table row by row. Uses the tiny random model (fast to convert and quantize) by its path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_evaluate import tiny_hf  # noqa: F401  (the shared tiny-model fixture)
from test_ui_api import run_ui

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 600_000  # builds and two workers on two shared cores

# Records each arena column's text every time the columns change, to see the answers arrive in pieces.
RECORD_JS = """() => {
  window.__arena = [];
  const root = document.querySelector('#compare-arena');
  new MutationObserver(() => {
    const cols = [...root.querySelectorAll('.arena-col')].map(c => [c.dataset.variant, c.dataset.state,
                   c.querySelector('.arena-text').innerText, c.querySelector('.arena-stats').innerText]);
    window.__arena.push(cols);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Path) -> Iterator[Any]:  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with run_ui(tmp_path_factory.mktemp("ui-compare")) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_function("document.querySelector('#load-status')?.innerText.includes('No model loaded')")
        page.click("#tab-compare-button")
        model = page.locator("#compare-model input")
        model.fill(str(tiny_hf))
        model.press("Enter")
        page.locator("#compare-levels label", has_text="Q4_0").click()  # untick: F16 + Q8_0 remain
        page.fill("#compare-prompt textarea", "Say hello.")
        yield page
        browser.close()


def test_arena_streams_both_answers_then_quality_table_fills(page: Any) -> None:
    page.evaluate(RECORD_JS)
    page.click("#compare-arena-btn")
    page.wait_for_function(
        "() => { const c = document.querySelectorAll('#compare-arena .arena-col[data-state=done]');"
        " return c.length === 2; }"
    )
    snapshots = page.evaluate("window.__arena")
    for label in ("F16", "Q8_0"):
        texts = [col[2] for snap in snapshots for col in snap if col[0] == label and col[1] == "running"]
        assert len(set(texts)) >= 2, (label, texts[:5])  # the answer grew while it streamed
    finals = {col[0]: col for col in snapshots[-1]}
    assert set(finals) == {"F16", "Q8_0"}
    assert all("tok/s" in col[3] and "ms" in col[3] for col in finals.values())

    page.locator("#compare-nf4 input").check()  # the quality run adds a saved bitsandbytes variant
    page.click("#compare-quality-btn")
    page.wait_for_function("document.querySelector('#compare-status').innerText.includes('Quality run finished')")
    path = ROOT / "test-artifacts" / "ui-compare.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    # Gradio's Dataframe draws its body as virtual rows, like the chat tab's turns table
    rows = [r.strip() for r in page.locator("#compare-table .virtual-row").all_inner_texts() if r.strip()]
    assert [r.split()[0] for r in rows] == ["F16", "Q8_0", "NF4"], rows
    page.locator("#compare-quality-chart img").wait_for()


@pytest.mark.parametrize(
    ("variant", "loaded"), [("NF4", ("-nf4", "saved NF4", "quant nf4")), ("Q8_0", ("-Q8_0.gguf", "llamacpp"))]
)
def test_clicking_a_row_loads_that_variant_in_chat(page: Any, variant: str, loaded: tuple[str, ...]) -> None:
    page.click("#tab-compare-button")  # the table the arena test filled; a click moves to the Chat tab
    row = page.locator("#compare-table .virtual-row", has_text=variant).first
    row.locator("[role=gridcell]").first.click(timeout=30_000)
    page.wait_for_function(
        "(want) => { const s = document.querySelector('#load-status').innerText;"
        " return s.includes('Loaded') && want.every(w => s.includes(w)); }",
        arg=list(loaded),
        timeout=180_000,
    )
    assert page.locator("#tab-chat").is_visible() and not page.locator("#tab-compare").is_visible()

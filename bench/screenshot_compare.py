"""The README's Compare-tab screenshot, from a real run on the default model.

Starts `localrun ui` from this checkout (its own store, kept between runs so the variants are built once),
opens the Compare tab in headless Chromium, runs the arena on F16 + Q8_0 + Q4_0 of the default model (its
F16 rebuilt from the dequantised weights) with the tab's default prompt, then a quality run on the bundled
text, and saves the tab as ui/screenshot-compare.png. Slow on a 2-core CPU (builds, then every variant's
perplexity over the whole text): run it niced.

Run: nice -n 19 python bench/screenshot_compare.py [--home DIR] [--levels Q8_0,Q4_0] [--out PNG]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 3_600_000  # builds and the whole text through three variants on two shared cores


@contextmanager
def running_ui(home: Path):  # type: ignore[no-untyped-def]
    """`localrun ui` on a free port with `home` as its store; yields the URL, stops it with Ctrl-C."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOCALRUN_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False"}
    env["HF_HUB_OFFLINE"] = "1"
    log = (home / "ui.log").open("w")
    cmd = [sys.executable, "-m", "localrun.cli", "ui", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"localrun ui exited:\n{(home / 'ui.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("localrun ui did not answer in 180 s") from None
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


def take(url: str, levels: list[str], out: Path) -> None:
    """Arena, then quality run, then the screenshot of the whole Compare tab."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_function("document.querySelector('#load-status')?.innerText.includes('No model loaded')")
        page.click("#tab-compare-button")
        for box in page.locator("#compare-levels label").all():
            name = box.inner_text().strip()
            if box.locator("input").is_checked() != (name in levels):
                box.click()
        started = time.monotonic()
        page.click("#compare-arena-btn")
        page.wait_for_function("document.querySelector('#compare-status').innerText.includes('Arena finished')")
        print(f"arena done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        page.click("#compare-quality-btn")
        page.wait_for_function("document.querySelector('#compare-status').innerText.includes('Quality run finished')")
        page.locator("#compare-quality-chart img").wait_for()
        page.locator("#compare-speed-chart img").wait_for()
        print(f"quality run done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        print(page.inner_text("#compare-table"), file=sys.stderr)
        page.wait_for_timeout(1000)  # the charts' images finish decoding
        page.locator("#tab-compare").screenshot(path=str(out))
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path.home() / ".cache/localrun/screenshot-home")
    parser.add_argument("--levels", default="Q8_0,Q4_0", help="levels ticked besides the F16 reference")
    parser.add_argument("--out", type=Path, default=ROOT / "ui" / "screenshot-compare.png")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: install Debian's chromium")
    args.home.mkdir(parents=True, exist_ok=True)
    with running_ui(args.home) as url:
        take(url, [s.strip().upper() for s in args.levels.split(",") if s.strip()], args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

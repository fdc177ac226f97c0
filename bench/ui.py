"""Generation speed seen in the web UI (headless Chromium) vs the same reply from `localrun chat -p`.

Starts `localrun ui`, loads the default model, and for each of N rounds: sends a fixed prompt by pressing Enter
(max_tokens 200, temperature 0, EOS ignored), waits for "Done" and reads the generation tok/s the live panel
shows (#m-decode-tps data-value); then runs `localrun chat -p` with the same prompt and flags and reads its
stats line. The two kinds of run alternate, so a busy neighbour slows both alike. Prints medians and the ratio,
and the CPU seconds Chromium and the UI server spent per reply (what the browser costs the cores llama.cpp
runs on) and per second with the page open and idle. Updates are paced in time, so the CPU per reply grows with
the reply's wall time: compare it between runs at similar rates. Writes bench/results/ui.json.

Run: python bench/ui.py [--runs 5] [--out bench/results/ui.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "Write a long story about a lighthouse keeper and a storm."
MAX_TOKENS = 200
TIMEOUT_MS = 240_000
PASS_RATIO = 0.85
# Playwright polls a wait_for_function on every animation frame by default, which makes the page draw 60 frames a
# second while a reply streams: a cost of the harness, not of the UI. A person watching does not poll.
POLL_MS = 250
IDLE_S = 5.0
_GEN = re.compile(r"gen ([\d.]+) tok/s")


def localrun_command() -> list[str]:
    return [sys.executable, "-c", "import sys; from localrun.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(home: Path) -> tuple[subprocess.Popen, str]:
    """`localrun ui` on a free port with its own model store; returns the process and its URL once it answers."""
    port = free_port()
    env = {**os.environ, "LOCALRUN_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = (home / "ui.log").open("w")
    proc = subprocess.Popen(
        [*localrun_command(), "ui", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"localrun ui exited:\n{(home / 'ui.log').read_text()}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("localrun ui did not answer in 180 s") from None
            time.sleep(0.5)


def stop_ui(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (0 for any that ended)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def process_groups(ui_pid: int) -> dict[str, list[int]]:
    """Chromium's processes (children of this script), the UI server, and the model worker (its child)."""
    import psutil

    me, server = psutil.Process(), psutil.Process(ui_pid)
    browser = [p.pid for p in me.children(recursive=True) if "chrom" in p.name().lower()]
    return {"browser": browser, "server": [ui_pid], "worker": [p.pid for p in server.children(recursive=True)]}


def set_value(page: Any, elem_id: str, value: str) -> None:
    """Type a number into a control; retry when a late UI update (the model's recommended settings) overwrote it."""
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    for _ in range(5):
        box.fill(value)
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == value:
            return
    raise SystemExit(f"#{elem_id} would not keep the value {value}")


def prepare(page: Any, url: str, n_threads: int | None) -> None:
    """Open the page, load the default model and set max_tokens, temperature and ignore-EOS."""
    page.goto(url)
    page.wait_for_function("document.querySelector('#load-status')?.innerText.includes('No model loaded')")
    if n_threads is not None:
        page.click("#load-options button")
        set_value(page, "set-n_threads", str(n_threads))
        page.click("#load-options button")
    page.click("#load-btn")
    page.wait_for_function("document.querySelector('#load-status').innerText.includes('Loaded')")
    page.click("#sampling-options button")
    set_value(page, "set-max_tokens", str(MAX_TOKENS))
    set_value(page, "set-temperature", "0")
    page.check("#set-ignore_eos input")
    page.click("#sampling-options button")  # folded away, as a user would leave it


def main_thread_s(cdp: Any) -> dict[str, float]:
    """Seconds the page's main thread has spent so far: in all tasks, in script, and in style and layout."""
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return {
        "page_task_s": metrics["TaskDuration"],
        "page_script_s": metrics["ScriptDuration"],
        "page_layout_s": metrics["LayoutDuration"] + metrics["RecalcStyleDuration"],
    }


def ui_run(page: Any, cdp: Any, groups: dict[str, list[int]]) -> dict[str, float]:
    """One reply in the browser: the page's generation tok/s, and the CPU seconds each part spent on it."""
    page.click("#clear-btn")  # every run answers the same one-message conversation
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 0", polling=POLL_MS)
    page.wait_for_function("document.querySelector('#chat-status').innerText.trim() === ''", polling=POLL_MS)
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    page_before = main_thread_s(cdp)
    page.fill("#chat-input textarea", PROMPT)
    page.press("#chat-input textarea", "Enter")
    started = time.monotonic()
    page.wait_for_function(
        "document.querySelector('#chat-status').innerText.trim().startsWith('Done')",
        timeout=TIMEOUT_MS,
        polling=POLL_MS,
    )
    wall_s = time.monotonic() - started
    status = page.inner_text("#chat-status")
    if "(length)" not in status:
        raise SystemExit(f"the UI reply did not run to max_tokens: {status}")
    tokens = float(page.get_attribute("#m-tokens", "data-value"))
    if tokens != MAX_TOKENS:
        raise SystemExit(f"the UI generated {tokens} tokens, not {MAX_TOKENS}")
    result = {"decode_tps": float(page.get_attribute("#m-decode-tps", "data-value")), "wall_s": wall_s}
    result.update({f"{name}_cpu_s": cpu_seconds(pids) - before[name] for name, pids in groups.items()})
    result.update({k: v - page_before[k] for k, v in main_thread_s(cdp).items()})
    return result


def idle_rates(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds per second the browser and the UI server spend with the page open and nothing happening."""
    before = {name: cpu_seconds(groups[name]) for name in ("browser", "server")}
    time.sleep(IDLE_S)
    return {f"{name}_idle_cpu_s_per_s": (cpu_seconds(groups[name]) - before[name]) / IDLE_S for name in before}


def cli_run(home: Path, n_threads: int | None) -> float:
    """`localrun chat -p` with the same prompt and flags; its generation tok/s from the stats line."""
    env = {**os.environ, "LOCALRUN_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    flags = ["--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--ignore-eos"]
    flags += [] if n_threads is None else ["--n-threads", str(n_threads)]
    done = subprocess.run(
        [*localrun_command(), "chat", "-p", PROMPT, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = _GEN.search(done.stderr)
    if done.returncode != 0 or not found or f"{MAX_TOKENS} tok" not in done.stderr:
        raise SystemExit(f"localrun chat failed ({done.returncode}):\n{done.stderr}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved pairs of runs (default 5)")
    parser.add_argument("--n-threads", type=int, default=None, help="llama.cpp threads for both (default: theirs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ui.json")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    ui_runs: list[dict[str, float]] = []
    cli_tps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="localrun-bench-ui-") as tmp:
        home = Path(tmp)
        proc, url = start_ui(home)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                prepare(page, url, args.n_threads)
                groups = process_groups(proc.pid)
                cdp = page.context.new_cdp_session(page)
                cdp.send("Performance.enable")
                ui_run(page, cdp, groups)  # warm-up: the first reply pays for first-use costs on both sides
                idle = idle_rates(groups)
                for i in range(args.runs):
                    ui_runs.append(ui_run(page, cdp, groups))
                    cli_tps.append(cli_run(home, args.n_threads))
                    u = ui_runs[-1]
                    print(
                        f"run {i + 1}: ui {u['decode_tps']:.1f} tok/s (browser {u['browser_cpu_s']:.2f} s CPU, "
                        f"server {u['server_cpu_s']:.2f} s) · cli {cli_tps[-1]:.1f} tok/s",
                        flush=True,
                    )
                browser.close()
        finally:
            stop_ui(proc)
    ui_median = statistics.median(r["decode_tps"] for r in ui_runs)
    cli_median = statistics.median(cli_tps)
    ratio = ui_median / cli_median
    cpu = {k: statistics.median(r[k] for r in ui_runs) for k in ui_runs[0] if k not in ("decode_tps", "wall_s")}
    result = {
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "runs": args.runs,
        "n_threads": args.n_threads,
        "ui_decode_tps_median": ui_median,
        "cli_decode_tps_median": cli_median,
        "ratio": ratio,
        "pass": ratio >= PASS_RATIO,
        "median_cpu_s_per_reply": cpu,
        "median_reply_wall_s": statistics.median(r["wall_s"] for r in ui_runs),
        "idle_cpu_s_per_s": idle,
        "ui_runs": ui_runs,
        "cli_decode_tps": cli_tps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)
    verdict = "PASS" if result["pass"] else "FAIL"
    print(
        f"UI {ui_median:.1f} tok/s vs CLI {cli_median:.1f} tok/s: ratio {ratio:.3f} "
        f"({verdict}, needs >= {PASS_RATIO}); per reply CPU s: browser {cpu['browser_cpu_s']:.2f}, "
        f"server {cpu['server_cpu_s']:.2f}, worker {cpu['worker_cpu_s']:.2f}; page main thread "
        f"{cpu['page_task_s']:.2f} (script {cpu['page_script_s']:.2f}, style+layout {cpu['page_layout_s']:.2f}); "
        f"idle CPU s per s: browser {idle['browser_idle_cpu_s_per_s']:.3f}, server {idle['server_idle_cpu_s_per_s']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

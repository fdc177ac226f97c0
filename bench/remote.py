"""What localrun shows for a remote llama-server, against what llama-server reports itself, request by request.

llama-server (built by bench/llama_tools.sh) serves the default model on loopback. Every request is answered
once, and two sets of figures are taken from that same reply:
- ours, as the UI and the CLI show them: TTFT and generation tok/s measured in stream_generate from the streamed
  pieces' arrival, through the remote backend (`localrun chat --url ...`);
- llama-server's own, from the `timings` of its final stream chunk: prompt_ms (its prompt processing) and
  predicted_per_second (generation, from its first token on, as ours).
Two paths are measured: the library path the UI uses (stream_generate on a RemoteBackend), and the CLI itself,
`localrun chat --url URL -p PROMPT`, whose stats line is read from stderr and held against llama-server's log
lines for the same request. Each prompt is new to the server (its prompt cache cannot help) and about
--n-prompt tokens; each reply is exactly --n-gen tokens (greedy, ignore_eos).

Ours is higher in TTFT by what llama-server does not count: the HTTP request, the chat template, tokenization
and our side of the stream; on loopback that should stay under 5 %, and so should the tok/s difference.

Run: python bench/remote.py [--n-prompt 512] [--n-gen 128] [--reps 7] [--cli-reps 3]
Writes bench/results/remote.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import REPO, default_model, llama_tool, physical_cores, write_result  # noqa: E402
from serve_common import free_port, wait_healthy  # noqa: E402

FILLER = (
    "A lighthouse keeper kept a log of every ship that passed, the weather at dawn and dusk, and the birds that "
    "rested on the rail. Over the years the log grew into a record of the coast itself. "
)
SERVER_LOG = re.compile(
    r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens.*?\n.*?eval time =\s+([\d.]+) ms /\s+(\d+) tokens "
    r"\(\s*[\d.]+ ms per token,\s+([\d.]+) tokens per second\)"
)
CLI_STATS = re.compile(
    r"TTFT (\d+) ms · (\d+) (?:new )?prompt tokens(?: \(\d+ cached\))? at ([\d.]+) tok/s · gen ([\d.]+) tok/s · (\d+) tok"
)


def prompt(n_prompt: int, tag: str) -> str:
    words = (FILLER * (n_prompt // 25 + 2)).split()
    return f"Note {tag}. Summarise this log: " + " ".join(words[: int(n_prompt * 0.75)])


def start_llama_server(model: Path, port: int, threads: int, log: Path) -> subprocess.Popen:
    cmd = [str(llama_tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", "1", "-c", "4096", "-t", str(threads), "-tb", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def library_runs(url: str, args: argparse.Namespace) -> list[dict]:
    """stream_generate on the remote backend (what the UI shows), with llama-server's timings of the same reply."""
    from localrun.backends import load_backend
    from localrun.engine.generate import generate
    from localrun.settings import LoadOptions, SamplingParams

    backend = load_backend(None, LoadOptions(backend="remote", url=url))
    params = SamplingParams(temperature=0.0, max_tokens=args.n_gen, ignore_eos=True, loop_guard=False)
    runs = []
    try:
        assert backend.engine == "llama.cpp", backend.engine
        for rep in range(-1, args.reps):
            ids = backend.tokenize(backend.render_chat([{"role": "user", "content": prompt(args.n_prompt, f"L{rep}")}]))
            summary = generate(backend, ids, params)
            if summary.error or summary.generated_tokens != args.n_gen:
                raise SystemExit(f"request failed: {summary.error or summary.generated_tokens}")
            timings = backend.last_end.engine_timings
            if rep >= 0:  # rep -1 warms the server up
                runs.append(pair(summary.ttft_s, summary.decode_tps, summary.prompt_tokens, timings))
    finally:
        backend.close()
    return runs


def cli_runs(url: str, args: argparse.Namespace, log: Path) -> list[dict]:
    """`localrun chat --url URL -p PROMPT`: its stats line against llama-server's log lines for that request."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    for rep in range(args.cli_reps):
        seen = len(SERVER_LOG.findall(log.read_text()))
        cmd = [sys.executable, "-m", "localrun.cli", "chat", "--url", url, "-p", prompt(args.n_prompt, f"C{rep}")]
        cmd += ["--temperature", "0", "--max-tokens", str(args.n_gen), "--ignore-eos", "--no-loop-guard"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=True)
        ours = CLI_STATS.search(done.stderr)
        if ours is None:
            raise SystemExit(f"no stats line in: {done.stderr[-400:]}")
        for _ in range(50):  # llama-server logs the timings just after the last chunk
            found = SERVER_LOG.findall(log.read_text())
            if len(found) > seen:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        prompt_ms, n_prompt, _gen_ms, _n_gen, gen_tps = found[seen]
        timings = {"prompt_ms": float(prompt_ms), "prompt_n": int(n_prompt), "predicted_per_second": float(gen_tps)}
        runs.append(pair(int(ours[1]) / 1000, float(ours[4]), int(ours[2]), timings, cli_tokens=int(ours[5])))
    return runs


def pair(ttft_s: float, decode_tps: float, prompt_tokens: int, timings: dict, **extra) -> dict:
    server_ttft = timings["prompt_ms"] / 1000
    return {
        "ours_ttft_s": ttft_s,
        "server_prompt_s": server_ttft,
        "ttft_ratio": ttft_s / server_ttft,
        "ours_decode_tps": decode_tps,
        "server_decode_tps": timings["predicted_per_second"],
        "decode_ratio": decode_tps / timings["predicted_per_second"],
        "prompt_tokens": prompt_tokens,
        "server_prompt_tokens": timings.get("prompt_n"),
        **extra,
    }


def summarise(runs: list[dict]) -> dict:
    med = statistics.median
    ttft, decode = med(r["ttft_ratio"] for r in runs), med(r["decode_ratio"] for r in runs)
    return {
        "ttft_ours_over_server_median": ttft,
        "decode_ours_over_server_median": decode,
        "ttft_overhead_ms_median": med((r["ours_ttft_s"] - r["server_prompt_s"]) * 1e3 for r in runs),
        "within_5_percent": abs(ttft - 1) <= 0.05 and abs(decode - 1) <= 0.05,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cli-reps", type=int, default=3)
    args = ap.parse_args()
    threads = physical_cores()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "llama-server.log"
        proc = start_llama_server(default_model(), port, threads, log)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, base, "llama-server")
            library = summarise(library_runs(f"{base}/v1", args))
            cli = summarise(cli_runs(f"{base}/v1", args, log))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    from localrun.bench import machine_info

    result = {
        "what": "localrun's figures for a remote llama-server vs llama-server's own timings, same replies",
        "model": str(default_model()),
        "llama_server": f"-np 1 -c 4096 -t {threads}",
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "library_stream_generate": library,
        "cli_stats_line": cli,
        "machine": machine_info(),
    }
    path = write_result("remote", result)
    for name, part in (("stream_generate (UI)", library), ("localrun chat (CLI)", cli)):
        print(
            f"{name:<22} TTFT ours/server {part['ttft_ours_over_server_median']:.3f} "
            f"(+{part['ttft_overhead_ms_median']:.1f} ms) · gen tok/s ours/server "
            f"{part['decode_ours_over_server_median']:.3f} · within 5 %: {part['within_5_percent']}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

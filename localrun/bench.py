"""`localrun bench`: our stream_generate against the bare library loop, measured in one run."""

from __future__ import annotations

import importlib
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from localrun.backends.base import Backend
from localrun.engine.generate import generate
from localrun.settings import SamplingParams

_FILLER = (
    "The history of computing is a story of people building tools to think with. Early machines "
    "filled rooms and needed teams to run them; later ones fit on a desk, then in a pocket. "
)


def bench_prompt(backend: Backend, n_tokens: int, rep: int) -> list[int]:
    """A prompt of exactly n_tokens; each repetition starts differently so no KV cache is reused."""
    text = f"Run {rep}. " + _FILLER * (n_tokens // 20 + 2)
    ids = backend.tokenize(text)
    if len(ids) < n_tokens:
        raise ValueError(f"bench prompt too short: {len(ids)} < {n_tokens}")
    return ids[:n_tokens]


def run_bench(backend: Backend, *, n_prompt: int = 512, n_gen: int = 128, reps: int = 5) -> dict:
    """Median TTFT, prompt and decode tokens/s of ours and of the bare loop, and their ratios.

    Each repetition runs ours and the bare loop back to back, so drifts of a noisy machine hit
    both alike. One untimed warm-up run of each comes first.
    """
    bare_bench = BASELINES[backend.name]
    params = SamplingParams(temperature=0.0, max_tokens=n_gen, ignore_eos=True)
    ours: dict[str, list[float]] = {"ttft_s": [], "prompt_tps": [], "decode_tps": []}
    bare: dict[str, list[float]] = {"prefill_s": [], "prompt_tps": [], "decode_tps": []}
    peak_ram = 0
    for rep in range(-1, reps):
        ids = bench_prompt(backend, n_prompt, rep)
        summary = generate(backend, ids, params)
        if summary.error or summary.generated_tokens != n_gen:
            raise RuntimeError(f"bench run failed: {summary.error or summary.finish_reason}")
        prefill_s, bare_decode = bare_bench(backend, bench_prompt(backend, n_prompt, rep + 1000), n_gen)
        if rep < 0:
            continue  # warm-up
        ours["ttft_s"].append(summary.ttft_s)
        ours["prompt_tps"].append(summary.prompt_tps)
        ours["decode_tps"].append(summary.decode_tps)
        bare["prefill_s"].append(prefill_s)
        bare["prompt_tps"].append(n_prompt / prefill_s)
        bare["decode_tps"].append(bare_decode)
        peak_ram = max(peak_ram, summary.peak_ram_bytes)
    med_ours = {k: statistics.median(v) for k, v in ours.items()}
    med_bare = {k: statistics.median(v) for k, v in bare.items()}
    report = backend.report
    return {
        "model": report.model_path,
        "backend": report.backend,
        "device": report.device,
        "n_threads": report.n_threads,
        "n_ctx": report.n_ctx,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "reps": reps,
        "ours": {"median": med_ours, "runs": ours, "peak_ram_bytes": peak_ram},
        "bare": {"median": med_bare, "runs": bare},
        "ratios": {
            "decode_ours_over_bare": med_ours["decode_tps"] / med_bare["decode_tps"],
            "ttft_ours_over_bare_prefill": med_ours["ttft_s"] / med_bare["prefill_s"],
        },
        "machine": machine_info(),
    }


def machine_info() -> dict:
    """What the numbers were measured on, for reproducible results."""
    from localrun.hardware import probe

    devices = probe()
    info = {
        "cpu": devices[0].name,
        "physical_cores": devices[0].physical_cores,
        "ram_bytes": devices[0].total_bytes,
        "gpus": [f"{d.name} ({d.driver})" for d in devices[1:]],
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    for module in ("llama_cpp", "torch", "transformers"):
        try:
            info[module] = importlib.import_module(module).__version__
        except ImportError:
            continue
    return info


def format_bench(result: dict) -> Sequence[str]:
    """The human-readable table."""
    o, b, r = result["ours"]["median"], result["bare"]["median"], result["ratios"]
    return [
        f"{result['backend']} on {result['device']} · {result['n_threads']} threads · ctx {result['n_ctx']} · "
        f"prompt {result['n_prompt']} tok · gen {result['n_gen']} tok · median of {result['reps']}",
        f"{'':<22}{'localrun':>12}{'bare loop':>12}{'ratio':>9}",
        f"{'TTFT / prompt eval':<22}{o['ttft_s'] * 1000:>9.1f} ms{b['prefill_s'] * 1000:>9.1f} ms{r['ttft_ours_over_bare_prefill']:>9.3f}",
        f"{'prompt tok/s':<22}{o['prompt_tps']:>12.1f}{b['prompt_tps']:>12.1f}{o['prompt_tps'] / b['prompt_tps']:>9.3f}",
        f"{'generation tok/s':<22}{o['decode_tps']:>12.1f}{b['decode_tps']:>12.1f}{r['decode_ours_over_bare']:>9.3f}",
        f"{'peak RSS':<22}{result['ours']['peak_ram_bytes'] / 1e6:>9.0f} MB",
    ]


# ---- the bare library loops ours is measured against -------------------------------------------------


def bare_llamacpp(backend: Any, prompt_ids: Sequence[int], n_gen: int) -> tuple[float, float]:
    """The baseline: a bare llama-cpp-python Llama.generate() loop on the same file, context and
    threads (flash attention on unless ours is off: Llama() cannot ask for auto, which is on on a
    CPU), greedy, no EOS check. Returns (prompt-eval seconds, decode tokens/s)."""
    import llama_cpp

    report = backend.report
    llm = llama_cpp.Llama(
        report.model_path,
        n_ctx=report.n_ctx,
        n_threads=report.n_threads,
        n_threads_batch=report.n_threads,
        n_gpu_layers=report.n_gpu_layers or 0,
        flash_attn=backend.options.flash_attn != "off",
        verbose=False,
    )
    try:
        t0 = time.perf_counter()
        t_first = t_last = t0
        for n, _token in enumerate(llm.generate(list(prompt_ids), temp=0.0), start=1):
            t_last = time.perf_counter()
            if n == 1:
                t_first = t_last
            if n >= n_gen:
                break
    finally:
        llm.close()
    return t_first - t0, (n_gen - 1) / (t_last - t_first)


def bare_hf(backend: Any, prompt_ids: Sequence[int], n_gen: int) -> tuple[float, float]:
    """The baseline: plain model.generate() with our exact settings (same cache, compile, attention),
    greedy, EOS ignored, no streamer. prefill_s is the time of a max_new_tokens=1 run; decode tok/s
    is (n_gen - 1) / (t(n_gen) - t(1)) from a second run of n_gen tokens.

    It runs on a fresh thread, as generate_tokens() does: on the CPU, torch work on the main thread
    after worker-thread runs was measured 3x slower (OpenMP thread teams compete), which is no
    property of either loop."""
    import torch

    params = SamplingParams(temperature=0.0, ignore_eos=True)
    timings: list[float] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                for n in (1, n_gen):
                    timings.append(_timed_generate(backend, prompt_ids, params, n))
        except BaseException as exc:  # re-raised in the caller below
            errors.append(exc)

    worker = threading.Thread(target=run, name="localrun-hf-bare")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return timings[0], (n_gen - 1) / (timings[1] - timings[0])


def _timed_generate(backend: Any, prompt_ids: Sequence[int], params: SamplingParams, n: int) -> float:
    import torch

    kwargs = backend.generate_kwargs(prompt_ids, params, max_new_tokens=n)
    t0 = time.perf_counter()
    out = backend.model.generate(**kwargs)
    if backend.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if out.shape[1] != len(prompt_ids) + n:
        raise RuntimeError(f"bare generate() made {out.shape[1] - len(prompt_ids)} tokens, not {n}")
    return elapsed


# The baseline for each backend, by Backend.name: a new backend adds its bare loop here.
BASELINES: dict[str, Callable[[Any, Sequence[int], int], tuple[float, float]]] = {
    "llamacpp": bare_llamacpp,
    "hf": bare_hf,
}


SPEC_PROMPT = "Write a short story about a robot who learns to paint, in about three paragraphs."


def run_spec_bench(
    backend: Backend, *, prompt: str = SPEC_PROMPT, n_gen: int = 256, reps: int = 3, until_eos: bool = False
) -> dict:
    """Speculative decoding against plain decoding on the same loaded target, interleaved (the order
    alternates per repetition), greedy: median decode tokens/s, speedup, acceptance. n_gen tokens with EOS
    ignored, or with until_eos the answer itself (at most n_gen tokens): past its answer a model writes
    text of no particular kind, which says little about a prompt chosen for what its answer copies."""
    drafter = backend.drafter
    if drafter is None:
        raise ValueError("the backend has no drafter: load it with --draft or --lookup")
    params = SamplingParams(temperature=0.0, max_tokens=n_gen, ignore_eos=not until_eos)
    ids = backend.tokenize(backend.render_chat([{"role": "user", "content": prompt}]))
    runs: dict[str, list] = {"plain": [], "draft": []}
    for rep in range(-1, reps):
        order = ("plain", "draft") if rep % 2 else ("draft", "plain")
        for mode in order:
            backend.drafter = drafter if mode == "draft" else None
            try:
                summary = generate(backend, ids, params)
            finally:
                backend.drafter = drafter
            if summary.error:
                raise RuntimeError(f"bench run failed: {summary.error}")
            if rep >= 0:  # rep -1 is the warm-up
                runs[mode].append(summary)
    plain, draft = runs["plain"], runs["draft"]
    med = statistics.median
    plain_tps, draft_tps = med(s.decode_tps for s in plain), med(s.decode_tps for s in draft)
    drafted = sum(s.draft_tokens for s in draft)
    accepted = sum(s.accepted_tokens for s in draft)
    rounds = sum(s.draft_rounds for s in draft)
    report = backend.report
    return {
        "model": report.model_path,
        "draft": report.details.get("draft"),
        "backend": report.backend,
        "device": report.device,
        "n_threads": report.n_threads,
        "n_ctx": report.n_ctx,
        "prompt_tokens": len(ids),
        "n_gen": n_gen,
        "until_eos": until_eos,
        "generated_tokens": med(s.generated_tokens for s in draft),
        "reps": reps,
        "plain_decode_tps": plain_tps,
        "draft_decode_tps": draft_tps,
        "speedup": draft_tps / plain_tps,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": accepted / rounds if rounds else None,
        "draft_s": med(s.draft_s for s in draft),
        "verify_s": med(s.verify_s for s in draft),
        "same_text": all(s.text == plain[0].text for s in (*plain, *draft)),
        "runs": {
            "plain_decode_tps": [s.decode_tps for s in plain],
            "draft_decode_tps": [s.decode_tps for s in draft],
            "draft_lengths": [list(s.draft_lengths) for s in draft],
        },
        "machine": machine_info(),
    }


def format_spec_bench(r: dict) -> Sequence[str]:
    acc = "n/a" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
    mean = "n/a" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
    return [
        f"{r['backend']} on {r['device']} · {r['n_threads']} threads · draft {r['draft']} · "
        f"prompt {r['prompt_tokens']} tok · gen {r['generated_tokens']} tok{' (the answer)' * r['until_eos']} · "
        f"greedy · median of {r['reps']}, interleaved",
        f"{'plain decode':<22}{r['plain_decode_tps']:>10.1f} tok/s",
        f"{'speculative decode':<22}{r['draft_decode_tps']:>10.1f} tok/s",
        f"{'speedup':<22}{r['speedup']:>10.2f}x",
        f"{'acceptance':<22}{acc:>10}   ({mean} accepted per round)",
        f"{'drafting / verifying':<22}{r['draft_s']:>8.2f} s / {r['verify_s']:.2f} s per run",
        f"{'same text as plain':<22}{'yes' if r['same_text'] else 'NO':>10}",
    ]


# ---- many clients at once: the same figures for a model here (through the worker serve uses) or elsewhere ----

LOAD_CLIENTS = (1, 2, 4)


def load_prompt(n_words: int, tag: str) -> str:
    """A plain prompt of about n_words words, different from its first word on so no engine reuses a cache."""
    words = (_FILLER * (n_words // 30 + 2)).split()
    return f"Request {tag}. " + " ".join(words[:n_words])


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def run_load_bench(
    send: Callable[[str, SamplingParams], Any],
    about: dict[str, Any],
    *,
    clients: Sequence[int] = LOAD_CLIENTS,
    n_prompt: int = 512,
    n_gen: int = 128,
    reps: int = 3,
    ignore_eos: bool = True,
) -> dict:
    """TTFT, prompt and generation tok/s per request, and total throughput, with 1..N clients at once.

    send(prompt, params) runs one request to its end and returns its GenerationSummary (stream_generate times it,
    as for every reply). At each level, `reps` rounds of that many clients start together; total throughput is
    the round's generated tokens over the round's wall time. One untimed request warms the engine first.
    """
    params = SamplingParams(temperature=0.0, max_tokens=n_gen, ignore_eos=ignore_eos, loop_guard=False)
    n_words = max(4, int(n_prompt * 0.75))  # about n_prompt tokens for English text; the engine's count is kept

    def one(tag: str) -> Any:
        summary = send(load_prompt(n_words, tag), params)
        if summary.error:
            raise RuntimeError(f"bench request failed: {summary.error}")
        return summary

    one("warm-up")
    levels = []
    for level in clients:
        summaries, totals, walls = [], [], []
        for rep in range(reps):
            results, wall = _round(one, level, rep)
            summaries += results
            walls.append(wall)
            totals.append(sum(s.generated_tokens for s in results) / wall)
        ram = [s.peak_ram_bytes for s in summaries if s.peak_ram_bytes]
        levels.append(
            {
                "clients": level,
                "ttft_s": _quantiles([s.ttft_s for s in summaries if s.ttft_s is not None]),
                "prompt_tps": statistics.median(s.prompt_tps for s in summaries if s.prompt_tps) if summaries else None,
                "decode_tps": statistics.median(s.decode_tps for s in summaries if s.decode_tps) if summaries else None,
                "total_tps": statistics.median(totals),
                "wall_s": statistics.median(walls),
                "prompt_tokens": statistics.median(s.prompt_tokens for s in summaries),
                "generated_tokens": statistics.median(s.generated_tokens for s in summaries),
                "peak_ram_bytes": max(ram) if ram else None,
                "runs": {"total_tps": totals, "ttft_s": [s.ttft_s for s in summaries]},
            }
        )
    base = levels[0]["total_tps"]
    for row in levels:
        row["total_over_one_client"] = row["total_tps"] / base if base else None
    return {
        **about,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "ignore_eos": ignore_eos,
        "reps": reps,
        "levels": levels,
        "machine": machine_info(),
    }


def _round(one: Callable[[str], Any], level: int, rep: int) -> tuple[list[Any], float]:
    """`level` clients sending one request each, all at once: their summaries, and the round's wall time."""
    results: list[Any] = [None] * level
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            results[i] = one(f"{level}-{rep}-{i}")
        except BaseException as exc:  # re-raised below, after the round
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return results, wall


def remote_sender(backend: Backend) -> Callable[[str, SamplingParams], Any]:
    """Requests to a remote engine, one per client thread, on the loaded RemoteBackend (its client is shared)."""

    def send(prompt: str, params: SamplingParams) -> Any:
        return generate(backend, backend.tokenize(prompt), params)

    return send


def worker_sender(engine: Any) -> Callable[[str, SamplingParams], Any]:
    """Requests to a model here, through the model process and its slots that `serve` and the UI use."""
    from localrun.engine.messages import GenerateRequest
    from localrun.server.engine import CancelWatch

    def send(prompt: str, params: SamplingParams) -> Any:
        summary = None
        for event in engine.submit(
            GenerateRequest(prompt=prompt, params=params, max_tokens=params.max_tokens), CancelWatch()
        ):
            summary = event.summary or summary
        if summary is None:
            raise RuntimeError("the model process ended the request without a summary")
        return summary

    return send


def load_about(report: Any, *, slots: int | None, engine: str, round_trip_s: float | None = None) -> dict:
    """The head of a load bench's JSON: what answered, where, with how many slots."""
    remote = report.backend == "remote"
    return {
        "model": report.details.get("model") if remote else report.model_path,
        "url": report.model_path if remote else None,
        "backend": report.backend,
        "device": report.device,
        "engine": engine,
        "round_trip_s": round_trip_s,
        "n_ctx": report.n_ctx,
        "slots": slots,
    }


def format_load_bench(result: dict) -> Sequence[str]:
    """The table of a load bench: one row per number of clients."""
    rtt = "" if result["round_trip_s"] is None else f" · round trip {result['round_trip_s'] * 1e3:.1f} ms"
    lines = [
        f"{result['engine']} · {result['device']} · {result['slots'] or '?'} slots · ctx {result['n_ctx']}{rtt}",
        f"prompt ~{result['n_prompt']} tok · gen {result['n_gen']} tok · greedy · median of {result['reps']} rounds",
        f"{'clients':>7}{'TTFT p50':>11}{'TTFT p90':>11}{'prompt tok/s':>14}{'gen tok/s':>11}{'total tok/s':>13}{'× 1 client':>12}",
    ]
    for row in result["levels"]:
        ttft = row["ttft_s"]
        ms = ["n/a" if v is None else f"{v * 1e3:.0f} ms" for v in (ttft["p50"], ttft["p90"])]
        prompt = "n/a" if row["prompt_tps"] is None else f"{row['prompt_tps']:.1f}"
        gen = "n/a" if row["decode_tps"] is None else f"{row['decode_tps']:.1f}"
        lines.append(
            f"{row['clients']:>7}{ms[0]:>11}{ms[1]:>11}{prompt:>14}{gen:>11}{row['total_tps']:>13.1f}"
            f"{row['total_over_one_client']:>11.2f}×"
        )
    return lines

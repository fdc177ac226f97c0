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
from localrun.generate import generate
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

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
    """The baseline: a bare llama-cpp-python generate() loop on the same Llama (same threads,
    context and batch), greedy, no EOS check. Returns (prompt-eval seconds, decode tokens/s)."""
    llm = backend.llama
    llm.reset()
    t0 = time.perf_counter()
    t_first = t_last = t0
    for n, _token in enumerate(llm.generate(list(prompt_ids), temp=0.0), start=1):
        t_last = time.perf_counter()
        if n == 1:
            t_first = t_last
        if n >= n_gen:
            break
    llm.reset()
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

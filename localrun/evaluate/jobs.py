"""The quality jobs of `localrun compare`, as request kinds of the shared model worker (localrun.engine.worker):
score the text with the reference model, score a variant against that reference, and read the model
process's peak memory. compare loads them with WorkerClient(plugins=(PLUGIN,)); a variant's answer is an
ordinary GenerateRequest on the same worker, so its figures come from the same engine as a chat's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from localrun.engine.worker_child import Task, unload

PLUGIN = "localrun.evaluate.jobs"


@dataclass(frozen=True, slots=True)
class ReferenceRequest:
    """Score the text with the reference model and save its top-k distributions at `reference`."""

    path: str
    reference: str
    text_path: str | None
    n_ctx: int
    stoppable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class QualityRequest:
    """Perplexity and KL-divergence of one variant against a saved reference (the loaded model is closed first)."""

    path: str
    quant: str
    reference: str
    text_path: str | None
    n_ctx: int
    label: str
    stoppable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class PeakMemoryRequest:
    """The model process's peak RSS so far: what loading and answering took, the process being this variant's own."""

    stoppable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Figures:
    """A job's result."""

    values: dict[str, Any]


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started (Linux VmHWM; ru_maxrss elsewhere).

    On Linux ru_maxrss carries the parent's peak over fork + exec, so it would charge the parent's memory here.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reference(request: ReferenceRequest, task: Task) -> None:
    from localrun.evaluate import quality

    unload(task)  # a scorer loads its own copy of the weights: two would double the memory
    with task.busy():
        scorer = quality.open_scorer(request.path, n_ctx=request.n_ctx)
        try:
            tokens = quality.tokenize_once(scorer, quality.read_text(request.text_path), n_ctx=request.n_ctx)
            quality.build_reference(scorer, tokens).save(request.reference)
        finally:
            scorer.close()
    task.send(Figures({}))


def score(request: QualityRequest, task: Task) -> None:
    from localrun.evaluate import quality

    unload(task)  # a scorer loads its own copy of the weights: two would double the memory
    with task.busy():
        scorer = quality.open_scorer(request.path, n_ctx=request.n_ctx, quant=request.quant)
        try:
            ref = quality.Reference.load(request.reference)
            quality.check_vocabulary(scorer, ref, quality.read_text(request.text_path), name=request.label)
            figures = quality.evaluate(scorer, ref).as_dict()
        finally:
            scorer.close()
    task.send(Figures(figures))


def peak_memory(request: PeakMemoryRequest, task: Task) -> None:
    task.send(Figures({"peak_ram_bytes": peak_rss_bytes()}))


HANDLERS = {ReferenceRequest: reference, QualityRequest: score, PeakMemoryRequest: peak_memory}

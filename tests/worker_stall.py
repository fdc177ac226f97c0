"""A test-only request kind for the worker: one dataclass and one handler, loaded with WorkerClient(plugins=...).

It stands in for a worker stuck in a native call (a sleep that ignores Stop), for one that spins on the Stop
check, and for a long job that sends heartbeats."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from localrun.engine.messages import Progress
from localrun.engine.worker_child import Task


@dataclass(frozen=True, slots=True)
class StallRequest:
    seconds: float
    mode: str = "native"  # "native": sleep, deaf to Stop; "cancel": spin on the Stop check; "job": beat while busy
    stoppable: ClassVar[bool] = True


def stall(request: StallRequest, task: Task) -> None:
    task.send(Progress("stalling"))
    deadline = time.monotonic() + request.seconds
    if request.mode == "cancel":
        while time.monotonic() < deadline and not task.cancel.is_set():
            pass
    elif request.mode == "job":
        with task.busy():
            time.sleep(request.seconds)
    else:
        time.sleep(request.seconds)
    task.send(Progress("done stalling"))


HANDLERS = {StallRequest: stall}

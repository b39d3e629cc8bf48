"""Stand-in workers for the pool's tests: no model, each task does what its behaviour says (answer with the
truth, sleep forever, exit the process, exit the first time only). Imported by spawned worker processes, so it
lives in a module of its own and its factory pickles with its behaviours."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kit.config import RunConfig
from kit.record import TaskRecord


@dataclass
class StandIns:
    """A worker factory: `behaviours` maps task ids to "sleep", "exit" or "exit-once" (others answer);
    `marks` is a directory where "exit-once" leaves a file, so a second worker answers the task."""

    behaviours: dict[str, str] = field(default_factory=dict)
    marks: Path | None = None
    load_s: float = 0.0  # how long "loading the model" takes

    def __call__(self, config: RunConfig, log: Callable[[str], None]) -> StandInWorker:
        time.sleep(self.load_s)
        return StandInWorker(self)


class StandInWorker:
    def __init__(self, factory: StandIns):
        self.factory = factory

    def describe(self) -> dict:
        return {"backend": "stand-in", "device": "cpu", "compiled": False}

    def run(self, job, log: Callable[[str], None]) -> TaskRecord:
        behaviour = self.factory.behaviours.get(job.task.id, "answer")
        if behaviour == "sleep":
            time.sleep(3600)
        if behaviour == "exit":
            os._exit(3)
        if behaviour == "exit-once":
            mark = self.factory.marks / job.task.id
            if not mark.exists():
                mark.touch()
                os._exit(3)
        truth = [(out, out) for out in job.task.test_outputs]
        late = job.ttt_deadline is not None and time.monotonic() >= job.ttt_deadline  # as train_task would stop
        return TaskRecord(job.task.id, truth, ttt_steps=0 if late else job.steps,
                          ttt_stopped="deadline" if late else "steps", ttt_seconds=0.01, infer_seconds=0.01,
                          vote_seconds=0.0, seconds=0.02)


class TorchThreads:
    """A worker factory whose workers import torch and describe how many CPU threads it runs: what the pool
    pinned before the import."""

    def __call__(self, config: RunConfig, log: Callable[[str], None]) -> StandInWorker:
        import torch

        worker = StandInWorker(StandIns())
        worker.describe = lambda: {"backend": "stand-in", "device": "cpu", "threads": torch.get_num_threads()}
        return worker

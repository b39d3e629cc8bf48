"""`TaskRecord`: one task's answer and what happened to it, the record every module passes on. `solve_task`
fills what the model did (TTT, candidates, seconds), the worker what it cost (memory plan, retries, the task-level
error), the runner when it ran and what was planned; the results store appends it to the JSONL log, and resume,
the planner's corrections and the report read it back. Torch-free."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from kit.grids import to_json
from kit.submission import Attempts


@dataclass
class TaskRecord:
    task: str
    attempts: list[Attempts] = field(default_factory=list)  # one pair per test input: what the submission holds
    # what the model did (solve_task); ttt_seconds None: the model never ran on this task
    ttt_steps: int = 0
    ttt_stopped: str | None = None  # "steps", "converged", "deadline" or "no data"
    ttt_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    ttt_seconds: float | None = None
    infer_seconds: float = 0.0
    vote_seconds: float = 0.0
    candidates: list[list[dict]] = field(default_factory=list)  # per test input, ranked (Candidate.to_record)
    solved: list[bool] | None = None  # per test input, where the true outputs are known
    errors: list[str] = field(default_factory=list)  # inside the task: a test input back at its baseline, a retry
    # with a smaller decoding batch, a merge that failed (inference through the LoRA branch)
    # what it cost (the worker)
    memory: dict | None = None  # the memory plan and the measured peak
    retried: dict | None = None  # the smaller settings of a retry after a failure
    error: str | None = None  # the task failed (every try): it keeps its baseline
    planned_steps: int | None = None
    planned_views: int | None = None
    seconds: float | None = None
    worker: int | None = None
    # when it ran (the runner)
    planned_seconds: float | None = None
    started: float | None = None  # seconds since the run's start
    finished: float | None = None
    fallback: str | None = None  # the run gave the task no model time ("no time"): a resumed run tries it again

    @property
    def model_answered(self) -> bool:
        """The attempts came from the model (not a fallback, not a failed task)."""
        return self.fallback is None and self.error is None

    def to_json(self) -> dict[str, Any]:
        """The log line: unset fields (None, no per-input errors) left out, grids as lists."""
        data = {k: v for k, v in asdict(self).items() if v is not None and not (k == "errors" and not v)}
        data["attempts"] = [[to_json(g) for g in pair] for pair in self.attempts]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRecord:
        """A record from a log line (keys the kit does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.attempts = [tuple(np.array(g, dtype=np.uint8) for g in pair) for pair in data.get("attempts", [])]
        return record

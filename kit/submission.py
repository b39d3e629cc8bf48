"""submission.json: build with fallbacks, validate against the challenges, score (kit.atomic writes it).

Kaggle's format: {task_id: [{"attempt_1": grid, "attempt_2": grid}, ...one per test input, in order]}.
A test output counts as solved if either attempt equals it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kit.grids import Grid, GridError, to_grid, to_json
from kit.tasks import Task, TaskSet, read_json

FALLBACK_GRID: list[list[int]] = [[0]]
Attempts = tuple[Grid, Grid]


class SubmissionError(ValueError):
    """A submission is incomplete or malformed; the message names the file, the task and the field."""


def baseline_attempts(task: Task) -> list[Attempts]:
    """The answer that needs no model: each test input as both attempts."""
    return [(grid, grid) for grid in task.test_inputs]


def build_submission(test_counts: dict[str, int], answers: dict[str, list[Attempts]]) -> dict[str, list[dict]]:
    """The JSON submission for every task id in `test_counts`; a task (or test input) with no answer gets the
    fallback grid, so the result is always complete."""
    submission = {}
    for task_id, count in test_counts.items():
        given = answers.get(task_id, [])
        entries = []
        for i in range(count):
            a1, a2 = (to_json(g) for g in given[i]) if i < len(given) else (FALLBACK_GRID, FALLBACK_GRID)
            entries.append({"attempt_1": a1, "attempt_2": a2})
        submission[task_id] = entries
    return submission


def validate_submission(submission: Any, test_counts: dict[str, int], where: str) -> None:
    """Refuse, with the file, task and field named, anything Kaggle would refuse or score as missing."""
    if not isinstance(submission, dict):
        raise SubmissionError(f"{where}: expected an object mapping task ids to lists of attempts")
    missing = [t for t in test_counts if t not in submission]
    if missing:
        raise SubmissionError(f"{where}: {len(missing)} task(s) missing, first {missing[:5]}")
    extra = [t for t in submission if t not in test_counts]
    if extra:
        raise SubmissionError(f"{where}: {len(extra)} task id(s) not in the challenges, first {extra[:5]}")
    for task_id, count in test_counts.items():
        entries = submission[task_id]
        if not isinstance(entries, list) or len(entries) != count:
            got = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise SubmissionError(f"{where}: task {task_id!r} needs {count} entries (one per test input), got {got}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != {"attempt_1", "attempt_2"}:
                keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise SubmissionError(f"{where}: task {task_id!r} entry {i} must have exactly attempt_1 and "
                                      f"attempt_2, got {keys}")
            for key in ("attempt_1", "attempt_2"):
                try:
                    to_grid(entry[key], f"{where}: task {task_id!r} entry {i} {key}")
                except GridError as e:
                    raise SubmissionError(str(e)) from None


def load_submission(path: str | Path, test_counts: dict[str, int]) -> dict[str, list[dict]]:
    """Read and validate a submission file."""
    try:
        submission = read_json(Path(path))
    except GridError as e:
        raise SubmissionError(str(e)) from None
    validate_submission(submission, test_counts, str(path))
    return submission


@dataclass
class Score:
    solved: int  # test outputs solved
    total: int  # test outputs
    per_task: dict[str, tuple[int, int]]  # task id -> (solved, total)

    @property
    def fraction(self) -> float:
        """Solved test outputs over all test outputs (the DESIGN's score)."""
        return self.solved / self.total if self.total else 0.0

    @property
    def task_mean(self) -> float:
        """Mean over tasks of the fraction of a task's test outputs solved."""
        return float(np.mean([s / n for s, n in self.per_task.values()])) if self.per_task else 0.0

    @property
    def tasks_fully_solved(self) -> int:
        return sum(s == n for s, n in self.per_task.values())

    def summary(self) -> str:
        return (f"score {self.fraction:.2%} ({self.solved}/{self.total} test outputs); "
                f"task mean {self.task_mean:.2%}; {self.tasks_fully_solved}/{len(self.per_task)} tasks fully solved")


def score_submission(submission: dict[str, list[dict]], solutions: dict[str, list[Grid]]) -> Score:
    """The official rule: a test output is solved if attempt_1 or attempt_2 equals it exactly."""
    per_task = {}
    for task_id, truths in solutions.items():
        entries = submission.get(task_id, [])
        solved = 0
        for i, truth in enumerate(truths):
            if i < len(entries):
                truth_json = to_json(truth)
                solved += entries[i].get("attempt_1") == truth_json or entries[i].get("attempt_2") == truth_json
        per_task[task_id] = (solved, len(truths))
    return Score(sum(s for s, _ in per_task.values()), sum(n for _, n in per_task.values()), per_task)


def solutions_of(task_set: TaskSet) -> dict[str, list[Grid]]:
    """Task id -> true test outputs, for the tasks whose solutions are known."""
    return {t.id: t.test_outputs for t in task_set.tasks if t.test_outputs is not None}

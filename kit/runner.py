"""Ties the pipeline together: load tasks, answer them, write and validate submission.json, score it."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from kit.config import RunConfig
from kit.submission import (Attempts, Score, baseline_attempts, build_submission, score_submission,
                            solutions_of, validate_submission, write_json_atomic)
from kit.tasks import TaskSet, attach_solutions, load_bundled, load_challenges, load_solutions


@dataclass
class RunResult:
    task_set: TaskSet
    submission: dict
    score: Score | None
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def load_task_set(config: RunConfig) -> TaskSet:
    """The tasks of this run: a challenges file/dir (plus solutions), or a bundled set; then --tasks."""
    if config.challenges is not None:
        task_set = load_challenges(config.challenges, skip_bad=config.skip_bad)
    else:
        task_set = load_bundled(config.dataset or "arc1-eval", skip_bad=config.skip_bad)
    if config.solutions is not None:
        attach_solutions(task_set, load_solutions(config.solutions), str(config.solutions))
    return task_set.select(config.tasks) if config.tasks else task_set


def run(config: RunConfig, log: Callable[[str], None] = print) -> RunResult:
    phases: dict[str, float] = {}
    with timed(phases, "load"):
        task_set = load_task_set(config)
    for bad in task_set.bad:
        log(f"skipped bad task {bad.id} (fallback answer): {bad.error}")
    log(f"{len(task_set.tasks)} tasks from {task_set.source}")
    if not config.no_model:
        raise SystemExit("no model backend is available yet: run with --no-model")
    with timed(phases, "answer"):
        answers: dict[str, list[Attempts]] = {t.id: baseline_attempts(t) for t in task_set.tasks}
    test_counts = task_set.test_counts()
    with timed(phases, "write"):
        submission = build_submission(test_counts, answers)
        validate_submission(submission, test_counts, str(config.out))
        write_json_atomic(config.out, submission)
    log(f"wrote {config.out} ({len(submission)} tasks, {sum(test_counts.values())} test inputs)")
    score = None
    solutions = solutions_of(task_set)
    if solutions:
        with timed(phases, "score"):
            score = score_submission(submission, solutions)
        log(score.summary())
    log("time: " + ", ".join(f"{name} {secs:.2f}s" for name, secs in phases.items()))
    return RunResult(task_set, submission, score, phases)

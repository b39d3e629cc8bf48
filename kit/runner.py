"""Ties the pipeline together: load tasks, write the baseline at once, solve task after task (each result
checkpointed as it comes), then validate the final submission.json and score it when solutions are known."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from kit.config import RunConfig
from kit.results import ResultsStore
from kit.submission import Score, baseline_attempts, score_submission, solutions_of
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
    if config.tasks:
        task_set = task_set.select(config.tasks)
    if config.solutions is not None:
        attach_solutions(task_set, load_solutions(config.solutions), str(config.solutions))
    return task_set


def solve_with_model(task_set: TaskSet, store: ResultsStore, config: RunConfig, phases: dict[str, float],
                     log: Callable[[str], None]) -> None:
    """Each task through TTT + augmented inference; a failure inside a task is logged and the task keeps its
    baseline answer, the run goes on."""
    from tqdm import tqdm

    from kit.backend import load_backend
    from kit.format import GridFormat
    from kit.solve import solve_task
    from kit.weights import ensure_default_model

    with timed(phases, "model load"):
        model_dir = config.model or ensure_default_model(log)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
        backend = load_backend(model_dir, config.backend, config.lora, config.max_length, config.seed, log)
        fmt = GridFormat.from_tokenizer(backend.tokenizer, str(model_dir))
    solved = 0
    bar = tqdm(task_set.tasks, desc="tasks", unit="task")
    for task in bar:
        start = time.perf_counter()
        try:
            attempts, details = solve_task(backend, fmt, task, config)
        except Exception as e:  # noqa: BLE001 - one task's failure must not end the run
            log(f"task {task.id} failed, baseline kept: {e!r}")
            attempts, details = baseline_attempts(task), {"error": repr(e)}
        details["seconds"] = round(time.perf_counter() - start, 3)
        for phase in ("ttt", "infer"):
            phases[phase] = phases.get(phase, 0.0) + details.get(f"{phase}_seconds", 0.0)
        store.record(task.id, attempts, details)
        solved += sum(details.get("solved", []))
        if task.test_outputs is not None:
            bar.set_postfix(solved=solved)


def run(config: RunConfig, log: Callable[[str], None] = print) -> RunResult:
    phases: dict[str, float] = {}
    started = time.perf_counter()
    with timed(phases, "load"):
        task_set = load_task_set(config)
    for bad in task_set.bad:
        log(f"skipped bad task {bad.id} (fallback answer): {bad.error}")
    log(f"{len(task_set.tasks)} tasks from {task_set.source}")
    with timed(phases, "write"):
        store = ResultsStore(config.out, task_set.test_counts(), {t.id: baseline_attempts(t) for t in task_set.tasks})
    if not config.no_model:
        solve_with_model(task_set, store, config, phases, log)
    submission = store.submission()
    log(f"wrote {config.out} ({len(submission)} tasks, {sum(store.test_counts.values())} test inputs)")
    score = None
    solutions = solutions_of(task_set)
    if solutions:
        with timed(phases, "score"):
            score = score_submission(submission, solutions)
        log(score.summary())
    log(f"time {time.perf_counter() - started:.1f}s: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
    return RunResult(task_set, submission, score, phases)

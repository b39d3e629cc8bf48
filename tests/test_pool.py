"""The worker pool cannot hang, with stand-in workers (tests/stand_in_workers.py, no model): a worker that
sleeps forever is killed at its job's hard deadline and replaced, one that exits mid-job gives its job back once
then the job falls back, one killed as it takes its job (before it could say anything) gives the job back too;
a run with a budget ends inside it with a valid submission and every other task's answer kept; each worker runs
its share of the CPU threads."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from stand_in_workers import StandIns, TorchThreads

from kit.config import RunConfig
from kit.pool import ProcessPool
from kit.results import ResultsStore, log_path, read_task_records
from kit.runner import solve_all
from kit.schedule import Profile
from kit.submission import baseline_attempts, load_submission
from kit.tasks import load_bundled
from kit.workers import Job

IDS = ["66e6c45b", "00576224", "be03b35f", "4cd1b7b2"]  # small ARC-1 eval tasks


@pytest.fixture(scope="module")
def tasks():
    return load_bundled("arc1-eval").select(IDS)


def fast_profile(path: Path) -> Path:
    """A profile under which every level of these tasks is planned to take well under a second."""
    Profile(train_tokens_per_s=1e7, prefill_tokens_per_s=1e7, train_step_s=0.0, decode_step_s=0.0,
            decode_row_s=0.0, task_overhead_s=0.01, model_load_s=0.0, calibrated=True).save(path)
    return path


def run_with(tmp_path: Path, tasks, behaviours: dict[str, str], budget: float, workers: int = 2,
             load_s: float = 0.0) -> tuple[float, dict, dict]:
    """solve_all with stand-in workers under `budget` seconds (4 s of it the safety margin): (seconds taken,
    the log's records by task, the submission as written)."""
    out = tmp_path / "submission.json"
    config = RunConfig(out=out, budget=budget, margin=4.0, workers=workers,
                       profile=fast_profile(tmp_path / "throughput.json"))
    store = ResultsStore(out, tasks.test_counts(), {t.id: baseline_attempts(t) for t in tasks.tasks})
    marks = tmp_path / "marks"
    marks.mkdir()
    started = time.monotonic()
    solve_all(tasks, store, config, started, {}, {}, lambda _: None, StandIns(behaviours, marks, load_s))
    taken = time.monotonic() - started
    records = {r.task: r for r in read_task_records(log_path(out))}
    return taken, records, load_submission(out, tasks.test_counts())


def answered(submission: dict, task) -> bool:
    return all(np.array_equal(np.array(s["attempt_1"]), truth)
               for s, truth in zip(submission[task.id], task.test_outputs))


def at_baseline(submission: dict, task) -> bool:
    return all(np.array_equal(np.array(s["attempt_1"]), grid) for s, grid in zip(submission[task.id],
                                                                                   task.test_inputs))


def test_a_worker_that_sleeps_forever_is_killed_and_the_run_ends_inside_its_budget(tmp_path, tasks):
    taken, records, submission = run_with(tmp_path, tasks, {IDS[0]: "sleep"}, budget=10.0)  # killed at 8 s
    assert taken < 10.0
    assert "killed past the task's hard deadline" in records[IDS[0]].error and at_baseline(submission,
                                                                                           tasks.tasks[0])
    assert all(answered(submission, t) for t in tasks.tasks[1:])  # the other worker (and the replacement) went on


def test_a_worker_that_exits_mid_job_gives_its_job_back_once_then_it_falls_back(tmp_path, tasks):
    taken, records, submission = run_with(tmp_path, tasks, {IDS[1]: "exit", IDS[2]: "exit-once"}, budget=30.0)
    assert taken < 30.0
    assert "died (exit code 3)" in records[IDS[1]].error and at_baseline(submission, tasks.tasks[1])
    assert records[IDS[2]].error is None and answered(submission, tasks.tasks[2])  # its second try answered
    assert answered(submission, tasks.tasks[0]) and answered(submission, tasks.tasks[3])


def test_a_worker_killed_as_it_takes_its_job_gives_the_job_back(tasks):
    logged = []
    pool = ProcessPool(RunConfig(), 1, logged.append, StandIns())
    try:
        pool.wait_ready(60)
        job = Job(tasks.tasks[0], steps=1, views=1)
        pool.submit(job)
        pool.slots[0].process.kill()  # at once: before or just after it took the job, never after answering
        record = pool.next_result()
    finally:
        pool.close()
    assert record.task == IDS[0] and record.error is None and record.worker == 1  # the replacement answered
    assert job.tries == 1 and any("goes back to the queue once" in line for line in logged)


def test_each_worker_process_runs_its_share_of_the_cpu_threads():
    """Two workers share the CPU's cores: each imports torch pinned to half of them (or one, beside a GPU)."""
    pool = ProcessPool(RunConfig(), 2, lambda _: None, TorchThreads())
    try:
        pool.wait_ready(60)
        assert pool.description["threads"] == pool.threads == (1 if pool.gpus else max(1, (os.cpu_count() or 1) // 2))
    finally:
        pool.close()


def test_model_loading_is_over_before_the_first_deadlines_are_set(tmp_path, tasks):
    """Workers that take 6 s to load, more than these tasks' training slack (5 s): their deadlines count from
    when the workers are ready, so none finds its training time gone."""
    taken, records, submission = run_with(tmp_path, tasks, {}, budget=20.0, load_s=6.0)
    assert all(r.error is None and r.ttt_stopped == "steps" for r in records.values())
    assert all(r.started >= 6.0 for r in records.values())
    assert all(answered(submission, t) for t in tasks.tasks)

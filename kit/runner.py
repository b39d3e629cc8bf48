"""Ties the pipeline together: load tasks, write the baseline at once, plan the budget, hand the tasks to the
workers (each result checkpointed as it comes, the plan redone with real timings), then validate the final
submission.json and score it when solutions are known.

The runner owns the clock: with a budget, the deadline is the run's start plus the budget less a safety margin;
no job is started that its estimate says cannot finish by then, and every job carries the deadline itself.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Iterator

from kit.atomic import write_json_atomic
from kit.config import RunConfig
from kit.record import TaskRecord
from kit.results import ResultsStore, summary_path
from kit.schedule import Assignment, Planner, Profile, TaskEstimate, format_duration, plan_summary
from kit.submission import Score, baseline_attempts, score_submission, solutions_of
from kit.tasks import Task, TaskSet, attach_solutions, load_bundled, load_challenges, load_solutions
from kit.weights import check_model_dir, ensure_default_model, model_positions

if TYPE_CHECKING:  # workers import the backend lazily; only the types are needed here
    from kit.workers import Job, WorkerFactory

TTT_SLACK = 1.5  # a task may train (and infer) this much longer than its estimate before its deadline stops it
KILL_GRACE = 20.0  # seconds past a task's deadline before its worker is killed (at least; 1/4 of its plan if more)


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


def load_profile(config: RunConfig, log: Callable[[str], None]) -> Profile:
    path = config.profile_path()
    if path.is_file():
        profile = Profile.load(path)
        log(f"throughput profile {path} ({profile.device}, {profile.model or 'model not named'})")
        return profile
    if config.profile is not None:
        raise FileNotFoundError(f"{path}: no such throughput profile (make one with --calibrate)")
    return Profile()


def make_planner(config: RunConfig, profile: Profile) -> Planner:
    return Planner(profile, config.ttt.steps, config.infer.augs, config.max_steps, config.max_augs,
                   config.infer.score_views, config.infer.search)


def with_context(config: RunConfig) -> RunConfig:
    """`config` with its context length resolved: --max-length, else the model's positions."""
    return replace(config, max_length=config.max_length or model_positions(config.model))


def estimate(config: RunConfig, task: Task) -> TaskEstimate:
    return TaskEstimate.of(task, config.ttt.batch_size, config.max_length)


def print_plan(config: RunConfig, task_set: TaskSet, log: Callable[[str], None]) -> list[Assignment]:
    """The plan a run would follow, with each task's expected time and the projected finish on the workers,
    simulated as the run does it: each task goes to the first free worker, cut down to what still fits.
    (`--plan-tasks` cycles the loaded tasks to project a run of another size, e.g. Kaggle's hidden set.)"""
    config = with_context(config)
    planner = make_planner(config, load_profile(config, log))
    tasks = task_set.tasks
    count = config.plan_tasks or len(tasks)
    estimates = {}
    for i in range(count if tasks else 0):
        est = estimate(config, tasks[i % len(tasks)])
        copy = i // len(tasks)
        estimates[f"{est.task_id}~{copy}" if copy else est.task_id] = est
    estimates = {key: replace(est, task_id=key) for key, est in estimates.items()}
    workers = config.workers or 1
    start = planner.profile.model_load_s
    end = config.work_seconds() if config.budget else float("inf")
    if config.budget:
        plan = planner.plan(list(estimates.values()), max(0.0, end - start) * workers)
    else:
        plan = planner.uniform(list(estimates.values()), None)
    free = [start] * workers
    log(f"{'task':<12} {'steps':>5} {'views':>5} {'base':>8} {'minutes':>8} {'finish':>10}")
    final = []
    for a in plan:
        w = free.index(min(free))
        a = planner.within(estimates[a.task_id], a, end - free[w])
        free[w] += a.seconds
        final.append(a)
        base = f"{a.base.steps}x{a.base.views}" if a.base else "="  # the level before the scale-up
        log(f"{a.task_id:<12} {a.steps:>5} {a.views:>5} {base:>8} {a.seconds / 60:>8.2f} "
            f"{format_duration(free[w]):>10}")
    finish = max(free, default=start)
    log(plan_summary(final, sum(free) - start * workers if not config.budget else (end - start) * workers,
                     workers))
    if config.budget:
        log(f"projected finish {format_duration(finish)} of a {format_duration(config.budget)} budget: margin "
            f"{format_duration(config.budget - finish)} (safety margin {format_duration(config.safety_margin())})"
            + ("" if planner.profile.calibrated else "; profile not calibrated: run --calibrate on this machine"))
    else:
        log(f"projected finish {format_duration(finish)} (no budget: every task at {config.ttt.steps} steps, "
            f"{config.infer.augs} views)")
    return final


def job_deadlines(job: Job, costs: tuple[float, float], now: float, deadline: float | None, margin: float) -> Job:
    """The job with its deadlines, from its planned (training, inference) seconds: training stops at the
    earlier of TTT_SLACK x its time and what leaves inference its time before the run's deadline; inference
    stops at TTT_SLACK x its time after that (so one runaway task cannot eat the tasks after it); the worker is
    killed KILL_GRACE later, at the latest half the safety margin past the run's deadline (the run still ends
    inside its budget). No run deadline: none of them."""
    if deadline is None:
        return job
    train, infer = costs
    step = train / job.steps if job.steps else 0.0  # the first step must fit too (no duration seen yet)
    job.ttt_deadline = min(deadline - infer - step, now + TTT_SLACK * train + 5)
    job.deadline = min(deadline, job.ttt_deadline + step + TTT_SLACK * infer + 5)
    job.kill_at = min(job.deadline + max(KILL_GRACE, 0.25 * (train + infer)), deadline + margin / 2)
    return job


def solve_all(task_set: TaskSet, store: ResultsStore, config: RunConfig, started: float,
              phases: dict[str, float], summary: dict, log: Callable[[str], None],
              make_worker: WorkerFactory | None = None) -> None:
    """Every task not done yet through a worker, in the planner's order, re-planning after each result.
    Each log record gets the planner's estimate and its start and finish (seconds since `started`); `summary`
    gets the backend, device and task counts. `make_worker` replaces the model's worker (tests' stand-ins)."""
    from tqdm import tqdm

    from kit.pool import InlinePool, ProcessPool, visible_gpus
    from kit.workers import Job

    config = with_context(config)
    deadline = started + config.work_seconds() if config.budget else None
    tasks = {t.id: t for t in task_set.tasks if t.id not in store.done}
    if store.done:
        log(f"resuming: {len(store.done)} tasks already done, {len(tasks)} to go")
    planner = make_planner(config, load_profile(config, log))
    estimates = {i: estimate(config, t) for i, t in tasks.items()}
    gpus = visible_gpus()
    workers = config.workers or max(1, gpus * config.workers_per_gpu)
    config = replace(config, compile="on" if config.compiles("cuda" if gpus else "cpu", len(tasks)) else "off")
    with timed(phases, "model load"):
        # With a budget even one worker runs in its own process: one that hangs can be killed, the run still ends.
        if workers == 1 and deadline is None:
            pool = InlinePool(config, log, make_worker)
        else:
            pool = ProcessPool(config, workers, log, make_worker)
        pool.wait_ready(None if deadline is None else max(0.0, deadline - time.monotonic()))
    in_flight: dict[str, tuple[Assignment, float]] = {}  # task -> (assignment, start)

    def replan(ids: list[str]) -> list[Assignment]:
        pending = [estimates[i] for i in ids]
        if deadline is None:
            return planner.uniform(pending, None)
        now = time.monotonic()
        busy = sum(max(0.0, a.seconds - (now - t0)) for a, t0 in in_flight.values())
        allocate = planner.uniform if config.allocation == "uniform" else planner.plan
        return allocate(pending, max(0.0, (deadline - now) * workers - busy))

    queue = replan(list(tasks))
    solved, counts = 0, {"trained": 0, "inference only": 0, "fallback (no time)": 0, "failed": 0}
    bar = tqdm(total=len(task_set.tasks), initial=len(store.done), desc="tasks", unit="task")
    try:
        while queue or in_flight:
            fallbacks = 0
            while queue and pool.idle():
                a = queue.pop(0)
                now = time.monotonic()
                if deadline is not None:
                    a = planner.within(estimates[a.task_id], a, deadline - now)
                if not a.runs_model:
                    at = round(now - started, 3)
                    store.record(TaskRecord(a.task_id, baseline_attempts(tasks[a.task_id]), fallback="no time",
                                            planned_seconds=0.0, started=at, finished=at), write=False)
                    counts["fallback (no time)"] += 1
                    fallbacks += 1
                    bar.update()
                    continue
                pool.submit(job_deadlines(Job(tasks[a.task_id], a.steps, a.views), planner.costs(
                    estimates[a.task_id], a), now, deadline, config.safety_margin()))
                in_flight[a.task_id] = (a, now)
            if fallbacks:
                store.write()
            if not in_flight:
                break
            record = pool.next_result()
            a, t0 = in_flight.pop(record.task)
            record.planned_seconds, record.started = round(a.seconds, 3), round(t0 - started, 3)
            record.finished = round(time.monotonic() - started, 3)
            planner.observe(estimates[record.task], record)
            for phase, seconds in (("ttt", record.ttt_seconds), ("infer", record.infer_seconds),
                                   ("vote", record.vote_seconds)):
                phases[phase] = phases.get(phase, 0.0) + (seconds or 0.0)
            store.record(record)
            solved += sum(record.solved or [])
            counts["failed" if record.error else "trained" if record.ttt_steps else "inference only"] += 1
            bar.update()
            if task_set.has_solutions():
                bar.set_postfix(solved=solved)
            queue = replan([a.task_id for a in queue])
    finally:
        bar.close()
        summary |= pool.describe()
        pool.close()
    summary["counts"] = counts
    log("tasks: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def run(config: RunConfig, log: Callable[[str], None] = print) -> RunResult:
    started = time.monotonic()  # the budget counts from here, model loading included
    phases: dict[str, float] = {}
    with timed(phases, "load"):
        task_set = load_task_set(config)
    for bad in task_set.bad:
        log(f"skipped bad task {bad.id} (fallback answer): {bad.error}")
    log(f"{len(task_set.tasks)} tasks from {task_set.source}")
    if config.plan_only:
        print_plan(config, task_set, log)
        return RunResult(task_set, {}, None, phases)
    if config.calibrate:
        from kit.calibrate import calibrate

        profile = calibrate(config, task_set, log)
        profile.save(config.profile_path())
        log(f"saved {config.profile_path()}")
        return RunResult(task_set, {}, None, phases)
    with timed(phases, "write"):
        store = ResultsStore(config.out, task_set.test_counts(),
                             {t.id: baseline_attempts(t) for t in task_set.tasks}, resume=config.resume)
    summary = run_summary(config, task_set)
    write_json_atomic(summary_path(config.out), summary)
    if not config.no_model:
        # The model directory is made ready and checked here, once: a bad one stops the run with one line, and
        # worker processes neither hash it again nor race each other to pack the default.
        with timed(phases, "model load"):
            if config.load_in_4bit:  # before anything loads, not in every worker
                from kit.backend.load import check_4bit, pick_device

                check_4bit(pick_device())
            if config.model is None:
                config = replace(config, model=ensure_default_model(log))
            else:
                check_model_dir(config.model)
        solve_all(task_set, store, config, started, phases, summary, log)
    submission = store.submission()
    log(f"wrote {config.out} ({len(submission)} tasks, {sum(store.test_counts.values())} test inputs)")
    score = None
    solutions = solutions_of(task_set)
    if solutions:
        with timed(phases, "score"):
            score = score_submission(submission, solutions)
        log(score.summary())
    elapsed = time.monotonic() - started
    budget = f" of a {format_duration(config.budget)} budget" if config.budget else ""
    log(f"time {format_duration(elapsed)}{budget}: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    summary |= {"status": "finished", "wall_s": round(elapsed, 3),
                "phases": {k: round(v, 3) for k, v in phases.items()},
                "score": score and {"solved": score.solved, "total": score.total}}
    write_json_atomic(summary_path(config.out), summary)
    return RunResult(task_set, submission, score, phases)


def run_summary(config: RunConfig, task_set: TaskSet) -> dict:
    """What a report needs to describe the run and reload its tasks; rewritten with times and score at the end
    (a killed run leaves status "running")."""
    return {
        "version": 1, "status": "running", "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": task_set.source, "dataset": None if config.challenges else config.dataset or "arc1-eval",
        "challenges": config.challenges and str(config.challenges),
        "solutions": config.solutions and str(config.solutions), "task_ids": [t.id for t in task_set.tasks],
        "model": None if config.no_model else str(config.model or "embedded default"), "backend": None,
        "device": None, "workers": config.workers or 1, "budget_s": config.budget,
        "margin_s": config.safety_margin() if config.budget else None,
        "deadline_s": config.work_seconds(), "wall_s": None,
        "phases": {}, "score": None, "counts": {},
        "settings": {"steps": config.ttt.steps, "augs": config.infer.augs, "batch_size": config.ttt.batch_size,
                     "lora_rank": config.lora.rank, "lr": config.ttt.lr,
                     "max_length": config.max_length or "the model's positions",
                     "rank_by": config.infer.rank_by, "seed": config.seed},
    }

"""Workers: each holds the base model once and solves the jobs it is given. One in this process (`InlinePool`),
or worker processes (`ProcessPool`: `--workers` on CPU, `--workers-per-gpu` per GPU, any run with a budget),
each handed its next job by the main process as soon as it is free.

A job carries its task, its level (TTT steps, views) and its deadlines; a job that fails (an exception, out of
memory) is retried once with half the steps and half the context, then falls back to the baseline answer; a
worker that dies or hangs is replaced and its job given back once or given up: whatever happens inside a task,
the run goes on and ends by its budget.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kit.config import RunConfig
from kit.memory.budget import MemoryBudget
from kit.memory.measure import PeakMemory, release_device_memory, trim_cpu_heap
from kit.record import TaskRecord
from kit.submission import baseline_attempts
from kit.tasks import Task


@dataclass
class Job:
    task: Task
    steps: int
    views: int
    ttt_deadline: float | None = None  # time.monotonic() instants (system-wide on Linux: valid across processes)
    deadline: float | None = None  # this task's own end of inference, from the plan (never past the run's)
    kill_at: float | None = None  # past this the pool kills the worker holding the job (ProcessPool only)
    tries: int = 0  # times a worker died holding this job


class Worker:
    """The model of one worker, loaded once; `run` solves a job on it."""

    def __init__(self, config: RunConfig, log: Callable[[str], None]):
        from kit.backend import load_backend
        from kit.format import GridFormat
        from kit.weights import check_model_dir, ensure_default_model, model_positions

        model_dir = config.model or ensure_default_model(log)  # the runner resolves it; benches may not
        manifest = check_model_dir(model_dir, hashes=False)  # the runner or ensure_default_model hashed the files
        log(f"model {model_dir}: " + ("no manifest (a plain model directory, used as it is)" if manifest is None
                                      else f"packed from {manifest.get('base')}"
                                      + (f" + {manifest['adapter']}" if manifest.get("adapter") else "")
                                      + (f", vocabulary shrunk to {manifest['vocab_size']} tokens"
                                         if manifest.get("token_map") else "")))
        self.config = config
        max_length = config.max_length or model_positions(model_dir)
        self.backend = load_backend(model_dir, config.backend, config.lora, max_length, config.seed, log,
                                    config.dtype, config.load_in_4bit)
        self.fmt = GridFormat.from_tokenizer(self.backend.tokenizer, str(model_dir))
        if config.compiles(self.backend.device.type):
            try:
                log(f"compiled the training pass in {self.backend.compile_training():.1f} s")
            except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported model: train eagerly
                log(f"training stays eager: compiling it failed ({type(e).__name__}: {e})")
        self.memory = MemoryBudget(self.backend, config.memory, log, share=config.workers_per_gpu)

    def describe(self) -> dict:
        """What ran the tasks, for the run summary."""
        device = self.backend.device
        name = f"{device} ({self.device_name()})" if device.type == "cuda" else str(device)
        return {"backend": self.backend.name, "device": name, "compiled": self.backend.compiled}

    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name(self.backend.device)

    def run(self, job: Job, log: Callable[[str], None]) -> TaskRecord:
        from kit import solve  # looked up at call time, so a test can wrap solve_task

        start = time.perf_counter()
        errors = []
        for config in self.attempt_configs(job):
            try:
                if self.backend.device.type == "cpu":
                    trim_cpu_heap()
                config, plan = self.memory.plan_task(job.task, config)
                with PeakMemory(self.backend.device.type) as peak:
                    record = solve.solve_task(self.backend, self.fmt, job.task, config, job.ttt_deadline,
                                              job.deadline)
                record.memory = plan | {"peak": peak.peak}
                if errors:
                    record.retried = {"steps": config.ttt.steps, "max_length": config.ttt.max_length}
                break
            except Exception as e:  # noqa: BLE001 - one task's failure must not end the run
                errors.append(repr(e))
                log(f"task {job.task.id} failed ({e!r}); " + ("retrying smaller" if len(errors) == 1 else
                                                              "baseline kept"))
                release_device_memory()
        else:
            record = TaskRecord(job.task.id, baseline_attempts(job.task))
        if errors:
            record.error = "; ".join(errors)
        record.planned_steps, record.planned_views = job.steps, job.views
        record.seconds = round(time.perf_counter() - start, 3)
        return record

    def attempt_configs(self, job: Job) -> list[RunConfig]:
        """The job's level, then a retry with half the steps, half the training context and half the decoding
        batch (what runs out of memory)."""
        c = self.config
        first = replace(c, ttt=replace(c.ttt, steps=job.steps), infer=replace(c.infer, augs=job.views))
        length = min(self.backend.max_length, first.ttt.max_length or self.backend.max_length)
        smaller = replace(first, ttt=replace(first.ttt, steps=job.steps // 2, max_length=max(64, length // 2)),
                          infer=replace(first.infer, batch_size=max(1, first.infer.batch_size // 2)))
        return [first, smaller]


WorkerFactory = Callable[[RunConfig, Callable[[str], None]], Worker]  # Worker, or a test's stand-in


class InlinePool:
    """One worker in this process: a job runs when it is submitted (nothing watches it: runs with a budget use
    a ProcessPool, which can kill a worker that hangs)."""

    def __init__(self, config: RunConfig, log: Callable[[str], None], make_worker: WorkerFactory | None = None):
        self.worker = (make_worker or Worker)(config, log)
        self.log = log
        self.done: list[TaskRecord] = []

    def idle(self) -> int:
        return 0 if self.done else 1

    def describe(self) -> dict:
        return self.worker.describe()

    def wait_ready(self, timeout: float | None = None) -> None:
        pass  # loaded in the constructor

    def submit(self, job: Job) -> None:
        self.done.append(self.worker.run(job, self.log))

    def next_result(self) -> TaskRecord:
        return self.done.pop(0)

    def close(self) -> None:
        pass


def visible_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU workers
        return 0


def _worker_main(index: int, gpu: int | None, threads: int, config: RunConfig, make_worker: WorkerFactory,
                 jobs: mp.Queue, results: mp.Queue) -> None:
    """A worker process: pin its GPU and its CPU threads (before torch is imported: a stand-in worker never
    imports it), load the model, serve the jobs of its own queue until it receives None."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads, read as it is imported
    if "torch" in sys.modules:  # imported already (by the parent's main module, re-run by spawn): too late for it
        sys.modules["torch"].set_num_threads(threads)

    def log(message: str) -> None:
        results.put(("log", index, f"[worker {index}] {message}"))

    try:
        worker = make_worker(config, log)
    except Exception as e:  # noqa: BLE001 - reported to the main process, which goes on without this worker
        results.put(("dead", index, repr(e)))
        return
    results.put(("ready", index, worker.describe()))
    while (job := jobs.get()) is not None:
        record = worker.run(job, log)
        record.worker = index
        results.put(("result", index, record))


@dataclass
class Slot:
    """One worker process, its own job queue and the job it holds (the pool always knows which worker has which
    job, so a worker that dies at any moment gives its job back)."""

    index: int
    gpu: int | None
    process: Any
    jobs: Any
    state: str = "loading"  # loading -> ready -> dead
    job: Job | None = None


class ProcessPool:
    """`size` worker processes fed by the main process, which hands each free worker its next job and watches
    them: a job whose worker dies comes back once (to another worker, or the dead one's replacement), then
    falls back to its baseline; a worker still busy at its job's `kill_at` is killed and replaced. Nothing a
    worker does can keep `next_result` from returning."""

    POLL_S = 0.5

    def __init__(self, config: RunConfig, size: int, log: Callable[[str], None],
                 make_worker: WorkerFactory | None = None):
        self.context = mp.get_context("spawn")  # no fork after torch threads exist
        self.gpus = visible_gpus()
        self.threads = max(1, (os.cpu_count() or 1) // size) if not self.gpus else 1
        self.config, self.log, self.size = config, log, size
        self.make_worker = make_worker or Worker
        self.results = self.context.Queue()
        self.slots: list[Slot] = []
        for i in range(size):
            self._spawn(i // config.workers_per_gpu % self.gpus if self.gpus else None)  # N slots per GPU
        self.backlog: list[Job] = []  # jobs given back by a dead worker, handed out before new ones
        self.lost: list[TaskRecord] = []  # jobs given up (their baseline), returned by next_result
        self.replacements = 0
        self.description: dict = {}  # the first ready worker's backend and device

    def _spawn(self, gpu: int | None) -> Slot:
        index = len(self.slots)
        jobs = self.context.Queue()
        process = self.context.Process(target=_worker_main, daemon=True, args=(
            index, gpu, self.threads, self.config, self.make_worker, jobs, self.results))
        process.start()
        self.slots.append(Slot(index, gpu, process, jobs))
        return self.slots[-1]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until no worker is still loading (or `timeout` seconds): the first jobs' deadlines are set after
        the model load, not during it. Every worker failing to start is an error."""
        end = None if timeout is None else time.monotonic() + timeout
        while any(s.state == "loading" for s in self.slots) and (end is None or time.monotonic() < end):
            self._receive(self.POLL_S)
            self._watch()
        if all(s.state == "dead" for s in self.slots):
            raise RuntimeError("no worker could start (see the log above)")

    def live(self) -> list[Slot]:
        return [s for s in self.slots if s.state != "dead"]

    def idle(self) -> int:
        free = sum(s.state == "ready" and s.job is None for s in self.slots)
        return max(0, free - len(self.backlog))

    def submit(self, job: Job) -> None:
        self.backlog.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if self.backlog and slot.state == "ready" and slot.job is None:
                slot.job = self.backlog.pop(0)
                slot.jobs.put(slot.job)

    def next_result(self) -> TaskRecord:
        """The next finished job; a job that cannot finish comes back as a failure with its baseline."""
        while not self.lost:
            record = self._receive(self.POLL_S)
            if record is not None:
                return record
            self._watch()
        return self.lost.pop(0)

    def _receive(self, timeout: float) -> TaskRecord | None:
        try:
            kind, index, payload = self.results.get(timeout=timeout)
        except queue.Empty:
            return None
        slot = self.slots[index]
        if kind == "log":
            self.log(payload)
        elif kind == "ready" and slot.state == "loading":
            slot.state = "ready"
            self.description = self.description or payload
            self._dispatch()
        elif kind == "dead":
            slot.state = "dead"
            self.log(f"worker {index} could not start: {payload}")
        elif kind == "result" and slot.job is not None and slot.job.task.id == payload.task:
            slot.job = None
            self._dispatch()
            return payload
        return None

    def _watch(self) -> None:
        """Give back the jobs of workers that died, kill and replace workers past their job's `kill_at`, give
        up jobs no live worker can take."""
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.state == "dead":
                continue
            if not slot.process.is_alive():
                self.log(f"worker {slot.index} died (exit code {slot.process.exitcode})")
                self._retire(slot, f"worker {slot.index} died (exit code {slot.process.exitcode})", requeue=True)
            elif slot.job is not None and slot.job.kill_at is not None and now >= slot.job.kill_at:
                self.log(f"worker {slot.index} passed the hard deadline of {slot.job.task.id}: killed")
                slot.process.kill()
                slot.process.join(timeout=10)
                self._retire(slot, f"worker {slot.index} killed past the task's hard deadline", requeue=False)
        if not self.live():
            self.lost += [self._baseline(job, "no live worker") for job in self.backlog]
            self.backlog.clear()
        for job in [j for j in self.backlog if j.kill_at is not None and now >= j.kill_at]:
            self.backlog.remove(job)
            self.lost.append(self._baseline(job, "no worker was free before its hard deadline"))

    def _retire(self, slot: Slot, why: str, requeue: bool) -> None:
        """A worker gone: its job back to the queue once (`requeue`) or given up; a replacement started while
        the pool has not replaced more workers than it has (a crash loop stops there)."""
        slot.state = "dead"
        job, slot.job = slot.job, None
        if job is not None:
            if requeue and job.tries == 0:
                job.tries += 1
                self.backlog.insert(0, job)
                self.log(f"{job.task.id} goes back to the queue once")
            else:
                self.lost.append(self._baseline(job, why, slot.index))
        if self.replacements < self.size:
            self.replacements += 1
            replacement = self._spawn(slot.gpu)
            self.log(f"worker {replacement.index} replaces worker {slot.index}")

    @staticmethod
    def _baseline(job: Job, why: str, worker: int = -1) -> TaskRecord:
        return TaskRecord(job.task.id, baseline_attempts(job.task), error=why, seconds=0.0, worker=worker)

    def describe(self) -> dict:
        return self.description

    def close(self) -> None:
        """Idle workers are told to stop; busy or unresponsive ones are killed (the run's results are written)."""
        for slot in self.live():
            if slot.job is None and slot.state == "ready":
                slot.jobs.put(None)
        for slot in self.live():
            slot.process.join(timeout=10 if slot.job is None and slot.state == "ready" else 0)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(timeout=10)

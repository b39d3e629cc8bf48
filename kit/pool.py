"""The pools that run workers (kit/workers.py): one in this process (`InlinePool`), or worker processes
(`ProcessPool`: `--workers` on CPU, `--workers-per-gpu` per GPU, any run with a budget), each handed its next job
by the main process as soon as it is free. A worker that dies or hangs is replaced and its job given back once or
given up: whatever happens inside a task, the run goes on and ends by its budget.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kit.config import RunConfig
from kit.record import TaskRecord
from kit.submission import baseline_attempts
from kit.workers import Job, Worker, WorkerFactory


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

"""Workers: each holds the base model once and solves the jobs it is given. One in this process (`InlinePool`),
or one process per GPU / per `--workers` on CPU (`ProcessPool`) fed from a shared queue.

A job carries its task, its level (TTT steps, views) and its deadlines; a job that fails (an exception, out of
memory) is retried once with half the steps and half the context, then falls back to the baseline answer:
whatever happens inside a task, the run goes on.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from kit.config import RunConfig
from kit.memory.budget import MemoryBudget
from kit.memory.measure import PeakMemory, trim_cpu_heap
from kit.record import TaskRecord
from kit.submission import baseline_attempts
from kit.tasks import Task


@dataclass
class Job:
    task: Task
    steps: int
    views: int
    ttt_deadline: float | None = None  # time.monotonic() instants (system-wide on Linux: valid across processes)
    deadline: float | None = None


class Worker:
    """The model of one worker, loaded once; `run` solves a job on it."""

    def __init__(self, config: RunConfig, log: Callable[[str], None]):
        from kit.backend import load_backend
        from kit.format import GridFormat
        from kit.weights import check_model_dir, ensure_default_model

        model_dir = config.model or ensure_default_model(log)  # the runner resolves it; benches may not
        manifest = check_model_dir(model_dir, hashes=False)  # the runner or ensure_default_model hashed the files
        log(f"model {model_dir}: " + ("no manifest (a plain model directory, used as it is)" if manifest is None
                                      else f"packed from {manifest.get('base')}"
                                      + (f" + {manifest['adapter']}" if manifest.get("adapter") else "")
                                      + (f", vocabulary shrunk to {manifest['vocab_size']} tokens"
                                         if manifest.get("token_map") else "")))
        self.config = config
        self.backend = load_backend(model_dir, config.backend, config.lora, config.max_length, config.seed, log)
        self.fmt = GridFormat.from_tokenizer(self.backend.tokenizer, str(model_dir))
        if config.compiles(self.backend.device.type):
            try:
                log(f"compiled the training pass in {self.backend.compile_training():.1f} s")
            except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported model: train eagerly
                log(f"training stays eager: compiling it failed ({type(e).__name__}: {e})")
        self.memory = MemoryBudget(self.backend, config.memory, log)

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
                self.free_memory()
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

    def free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class InlinePool:
    """One worker in this process: a job runs when it is submitted."""

    def __init__(self, config: RunConfig, log: Callable[[str], None]):
        self.worker = Worker(config, log)
        self.log = log
        self.done: list[TaskRecord] = []

    def idle(self) -> int:
        return 0 if self.done else 1

    def describe(self) -> dict:
        return self.worker.describe()

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


def _worker_main(index: int, gpu: int | None, threads: int, config: RunConfig, jobs: mp.Queue,
                 results: mp.Queue) -> None:
    """A worker process: pin its GPU (before torch is imported) or its CPU threads, load the model, serve jobs
    until it receives None."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    import torch

    torch.set_num_threads(threads)

    def log(message: str) -> None:
        results.put(("log", index, f"[worker {index}] {message}"))

    try:
        worker = Worker(config, log)
    except Exception as e:  # noqa: BLE001 - reported to the main process, which goes on without this worker
        results.put(("dead", index, repr(e)))
        return
    results.put(("ready", index, worker.describe()))
    while (job := jobs.get()) is not None:
        results.put(("start", index, job.task.id))
        record = worker.run(job, log)
        record.worker = index
        results.put(("result", index, record))


class ProcessPool:
    """`size` worker processes; each takes the next job as soon as it is free (a shared queue)."""

    def __init__(self, config: RunConfig, size: int, log: Callable[[str], None]):
        context = mp.get_context("spawn")  # no fork after torch threads exist
        gpus = visible_gpus()
        threads = max(1, (os.cpu_count() or 1) // size) if not gpus else 1
        self.jobs, self.results = context.Queue(), context.Queue()
        self.processes = [context.Process(target=_worker_main, daemon=True,
                                          args=(i, i % gpus if gpus else None, threads, config, self.jobs,
                                                self.results)) for i in range(size)]
        for p in self.processes:
            p.start()
        self.log = log
        self.size = size
        self.busy: dict[int, Job] = {}  # worker -> the job it took
        self.pending: list[Job] = []  # submitted, not yet reported back
        self.dead: set[int] = set()
        self.description: dict = {}  # the first ready worker's backend and device

    def idle(self) -> int:
        return max(0, self.size - len(self.dead) - len(self.pending))

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self.jobs.put(job)

    def next_result(self) -> TaskRecord:
        """The next finished job; a job whose worker died comes back as a failure with its baseline."""
        while True:
            try:
                kind, index, payload = self.results.get(timeout=1.0)
            except queue.Empty:
                lost = self._reap()
                if lost is not None:
                    return lost
                continue
            if kind == "log":
                self.log(payload)
            elif kind == "ready":
                self.description = self.description or payload
            elif kind == "start":
                self.busy[index] = next(j for j in self.pending if j.task.id == payload)
            elif kind == "dead":
                self.dead.add(index)
                self.log(f"worker {index} could not start: {payload}")
                if len(self.dead) == self.size:
                    raise RuntimeError(f"no worker could start: {payload}")
            elif kind == "result":
                self.busy.pop(index, None)
                self.pending = [j for j in self.pending if j.task.id != payload.task]
                return payload

    def describe(self) -> dict:
        return self.description

    def _reap(self) -> TaskRecord | None:
        """When a worker process has died (killed, out of memory), its job comes back as a failure."""
        for i, p in enumerate(self.processes):
            if i not in self.dead and not p.is_alive():
                self.dead.add(i)
                self.log(f"worker {i} died (exit code {p.exitcode})")
                if i in self.busy:
                    return self._give_up(self.busy.pop(i), f"worker {i} died (exit code {p.exitcode})", i)
        if len(self.dead) == self.size and self.pending:
            return self._give_up(self.pending[0], "no live worker", -1)
        return None

    def _give_up(self, job: Job, why: str, worker: int) -> TaskRecord:
        self.pending.remove(job)
        return TaskRecord(job.task.id, baseline_attempts(job.task), error=why, seconds=0.0, worker=worker)

    def close(self) -> None:
        for _ in self.processes:
            self.jobs.put(None)
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()

"""A worker holds the base model once and solves the jobs it is given (kit/pool.py runs workers: in this
process, or one process each).

A job carries its task, its level (TTT steps, views) and its deadlines; a job that fails (an exception, out of
memory) is retried once with half the steps and half the context, then falls back to the baseline answer.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

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

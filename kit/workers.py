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
from dataclasses import dataclass, field, replace
from typing import Any

from kit.config import RunConfig
from kit.format import answer_budget, sequence_tokens
from kit.memory.estimates import (
    ModelDims,
    decoding_batch,
    decoding_bytes,
    format_size,
    plan_training,
    uses_eager_attention,
)
from kit.memory.measure import PeakMemory, available_memory, resident_memory, trim_cpu_heap
from kit.shapes import plausible_side
from kit.submission import Attempts, baseline_attempts
from kit.tasks import Task


@dataclass
class Job:
    task: Task
    steps: int
    views: int
    ttt_deadline: float | None = None  # time.monotonic() instants (system-wide on Linux: valid across processes)
    deadline: float | None = None


@dataclass
class JobResult:
    task_id: str
    attempts: list[Attempts]
    details: dict = field(default_factory=dict)
    worker: int = 0


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

    def run(self, job: Job, log: Callable[[str], None]) -> JobResult:
        from kit import solve  # looked up at call time, so a test can wrap solve_task

        start = time.perf_counter()
        errors = []
        for config in self.attempt_configs(job):
            try:
                if self.backend.device.type == "cpu":
                    trim_cpu_heap()
                config, plan = self.memory.plan_task(job.task, config)
                with PeakMemory(self.backend.device.type) as peak:
                    attempts, details = solve.solve_task(self.backend, self.fmt, job.task, config,
                                                         job.ttt_deadline, job.deadline)
                details["memory"] = plan | {"peak": peak.peak}
                if errors:
                    details["retried"] = {"steps": config.ttt.steps, "max_length": config.ttt.max_length}
                break
            except Exception as e:  # noqa: BLE001 - one task's failure must not end the run
                errors.append(repr(e))
                log(f"task {job.task.id} failed ({e!r}); " + ("retrying smaller" if len(errors) == 1 else
                                                              "baseline kept"))
                self.free_memory()
        else:
            attempts, details = baseline_attempts(job.task), {}
        if errors:
            details["error"] = "; ".join(errors)
        details |= {"planned_steps": job.steps, "planned_views": job.views,
                    "seconds": round(time.perf_counter() - start, 3)}
        return JobResult(job.task.id, attempts, details)

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


# On a CPU glibc's heap keeps freed activations between live ones, so the resident set grows above the estimates
# (kit/memory/estimates.py) of what a task adds: measured with the default model 1.18x (d5c634a2, 4x710 tokens, no
# checkpointing), 2.0x (the same, checkpointed), up to 2.6x in the estimates' own measurements. Plans on a CPU leave
# that room. `steady_cpu_allocator` (kit/memory/measure.py) would make the estimates upper bounds but doubled a
# task's time (bench/cpu_allocator.py), so workers instead trim the heap before each task (`trim_cpu_heap`).
CPU_HEAP_SLACK = 2.6


class MemoryBudget:
    """The memory a worker may use, and per task the training shape and decoding batch that stay inside it
    (kit/memory/estimates.py's estimates from the model's dimensions and what the process already holds)."""

    def __init__(self, backend: Any, budget: int | None, log: Callable[[str], None]):
        base = backend.model.get_base_model()
        self.backend = backend
        self.lora_parameters = sum(p.numel() for p in backend.trainable_parameters())
        frozen = sum(p.numel() for p in base.parameters()) - self.lora_parameters
        self.dims = ModelDims.from_config(base.config, frozen, backend.dtype.itemsize)
        self.merged_bytes = backend.merged_weight_bytes()
        # Eager attention holds batch x heads x length^2 scores: decoding always (its kernel), training below
        # the backend's `sdpa_from` when it has one.
        self.scores = uses_eager_attention(backend.decode_attention)
        self.device = backend.device.type
        self.budget = budget or available_memory(self.device)
        log(f"memory budget {format_size(self.budget)} ({'given' if budget else 'free on the device'}), "
            f"{format_size(resident_memory(self.device))} held by the loaded model")

    def plan_task(self, task: Task, config: RunConfig) -> tuple[RunConfig, dict]:
        """`config` with the batch size, training length and decoding batch that fit, checkpointing set on the
        backend; and the plan, for the log. No training shape fits: no TTT. No decoding fits: MemoryError."""
        resident = resident_memory(self.device)
        slack = CPU_HEAP_SLACK if self.device == "cpu" else 1.0
        plannable = resident + int((self.budget - resident) / slack)  # the room the estimates may fill
        cap = min(self.backend.max_length, config.ttt.max_length or self.backend.max_length)
        longest = min(cap, max(sequence_tokens(task.train[:i] + task.train[i + 1:], q.input, q.output.shape)
                               for i, q in enumerate(task.train)))
        ttt = config.ttt
        plan = plan_training(plannable, resident, self.dims, ttt.batch_size, longest, self.lora_parameters,
                             self.scores, self.backend.sdpa_from)
        if plan is None:
            ttt = replace(ttt, steps=0)
        else:
            ttt = replace(ttt, batch_size=plan.batch_size,
                          max_length=plan.max_length if plan.max_length < longest else ttt.max_length)
            self.backend.set_checkpointing(plan.checkpointing)
        decode_length = min(self.backend.max_length, max(
            sequence_tokens(task.train, g) + answer_budget(plausible_side(task, g)) for g in task.test_inputs))
        batch = decoding_batch(plannable, resident, self.dims, config.infer.batch_size, decode_length, self.scores)
        if batch == 0:
            raise MemoryError(f"decoding {decode_length} tokens does not fit {format_size(self.budget)}")
        # Merged weights for inference (Backend.merged_adapter) only where their copy costs no decoding rows.
        merge = config.infer.merge_adapter and batch == decoding_batch(
            plannable, resident + self.merged_bytes, self.dims, batch, decode_length, self.scores)
        decoding = resident + self.merged_bytes * merge + decoding_bytes(self.dims, batch, decode_length, self.scores)
        record = {"budget": self.budget, "resident": resident, "train_batch": ttt.batch_size,
                  "train_length": ttt.max_length or longest, "checkpointing": bool(plan and plan.checkpointing),
                  "decode_batch": batch, "merged": merge,
                  "estimated_peak": max(decoding, plan.estimated_bytes if plan else 0)}
        return replace(config, ttt=ttt, infer=replace(config.infer, batch_size=batch, merge_adapter=merge)), record


class InlinePool:
    """One worker in this process: a job runs when it is submitted."""

    def __init__(self, config: RunConfig, log: Callable[[str], None]):
        self.worker = Worker(config, log)
        self.log = log
        self.done: list[JobResult] = []

    def idle(self) -> int:
        return 0 if self.done else 1

    def describe(self) -> dict:
        return self.worker.describe()

    def submit(self, job: Job) -> None:
        self.done.append(self.worker.run(job, self.log))

    def next_result(self) -> JobResult:
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
        result = worker.run(job, log)
        result.worker = result.details["worker"] = index
        results.put(("result", index, result))


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

    def next_result(self) -> JobResult:
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
                self.pending = [j for j in self.pending if j.task.id != payload.task_id]
                return payload

    def describe(self) -> dict:
        return self.description

    def _reap(self) -> JobResult | None:
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

    def _give_up(self, job: Job, why: str, worker: int) -> JobResult:
        self.pending.remove(job)
        return JobResult(job.task.id, baseline_attempts(job.task), {"error": why, "seconds": 0.0}, worker)

    def close(self) -> None:
        for _ in self.processes:
            self.jobs.put(None)
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()

"""One task through the method: reset LoRA -> TTT on leave-one-out views -> augmented decoding -> vote."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kit.augment import task_rng, task_seed
from kit.config import InferSettings, RunConfig
from kit.format import GridFormat
from kit.grids import Grid
from kit.infer import predict
from kit.memory.measure import release_device_memory
from kit.record import TaskRecord
from kit.tasks import Task
from kit.ttt import train_task
from kit.vote import Candidate, rank, two_attempts

if TYPE_CHECKING:  # the backend imports torch and transformers; only its type is needed here
    from kit.backend import Backend


def solve_task(backend: Backend, fmt: GridFormat, task: Task, config: RunConfig, ttt_deadline: float | None = None,
               deadline: float | None = None) -> TaskRecord:
    """Two attempts per test input, and what it took (steps, losses, candidates, seconds). Training stops at
    `ttt_deadline`; past `deadline` candidates are ranked by votes alone (no scoring pass). Both are
    time.monotonic() instants. A test input whose inference fails keeps its baseline (the error is recorded);
    the task's other answers stand."""
    ttt = train_task(backend, fmt, task, config.ttt, task_rng(config.seed, task.id, "ttt"),
                     seed=task_seed(config.seed, task.id), deadline=ttt_deadline)
    start = time.monotonic()
    rng = task_rng(config.seed, task.id, "infer")
    record = TaskRecord(task.id, ttt_steps=ttt.steps, ttt_stopped=ttt.stopped, ttt_tokens=ttt.tokens,
                        losses=[round(x, 4) for x in ttt.losses], ttt_seconds=round(ttt.seconds, 3))
    vote_seconds = 0.0
    with inference_weights(backend, config.infer.merge_adapter, record.errors):
        for i, test_input in enumerate(task.test_inputs):
            try:
                predicted = predict_or_retry_smaller(backend, fmt, task, test_input, config.infer, rng, deadline,
                                                     record.errors, f"test[{i}]")
                voting = time.monotonic()
                ranked = rank(predicted, config.infer.rank_by)
            except Exception as e:  # noqa: BLE001 - this test input falls back; the task's other answers stand
                ranked, voting = [], time.monotonic()
                record.errors.append(f"test[{i}]: {e!r}")
            record.attempts.append(two_attempts(ranked, fallback=test_input))
            vote_seconds += time.monotonic() - voting
            record.candidates.append([c.to_record() for c in ranked])
    record.infer_seconds = round(time.monotonic() - start - vote_seconds, 3)
    record.vote_seconds = round(vote_seconds, 4)
    if task.test_outputs is not None:
        record.solved = [any(np.array_equal(a, truth) for a in pair)
                         for pair, truth in zip(record.attempts, task.test_outputs)]
    return record


@contextmanager
def inference_weights(backend: Backend, merge: bool, errors: list[str]) -> Iterator[None]:
    """Merged weights where `merge` asks for them; a merge that fails (no memory for the copy, weights it
    cannot merge into) leaves inference on the LoRA branch, which computes the same answers, and says so."""
    with ExitStack() as stack:
        if merge:
            try:
                stack.enter_context(backend.merged_adapter())
            except Exception as e:  # noqa: BLE001 - the branch gives the same answers, only slower
                errors.append(f"merge: {e!r}; inference through the LoRA branch")
                release_device_memory()
        yield


def predict_or_retry_smaller(backend: Backend, fmt: GridFormat, task: Task, test_input: Grid,
                             settings: InferSettings, rng: np.random.Generator, deadline: float | None,
                             errors: list[str], label: str) -> list[Candidate]:
    """`predict`, and after a failure (out of memory in decoding or scoring, most often) once more with half
    the decoding batch and half its tokens per pass; a second failure propagates (the test input falls back)."""
    try:
        return predict(backend, fmt, task, test_input, settings, rng, deadline)
    except Exception as e:  # noqa: BLE001 - retried smaller below
        if settings.batch_size <= 1 and settings.max_batch_tokens <= 1:
            raise
        smaller = replace(settings, batch_size=max(1, settings.batch_size // 2),
                          max_batch_tokens=max(1, settings.max_batch_tokens // 2))
        errors.append(f"{label}: {e!r}; retried with decoding batch {smaller.batch_size}")
        release_device_memory()
        return predict(backend, fmt, task, test_input, smaller, rng, deadline)

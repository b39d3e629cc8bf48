"""`--calibrate`: measure what this machine does with this model, in about a minute, for the planner.

Training: real TTT steps (the kit's own loop) at two batch sizes on real tasks, fitted as a fixed cost per step
plus tokens over a rate. Decoding: the kit's batched greedy decoding at one row and at several, fitted as a
cost per step plus a cost per row and step. Prefill: the likelihood scoring pass, in tokens per second.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np

from kit.augment import task_rng
from kit.config import RunConfig
from kit.schedule import Profile
from kit.tasks import TaskSet

TRAIN_STEPS = 3  # timed steps per batch size, after one untimed warm-up step
DECODE_ROWS = (1, 8)


def least_squares_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope, both clamped to >= 0 (noise must not make a cost negative)."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return max(0.0, float(intercept)), max(1e-9, float(slope))


def calibrate(config: RunConfig, task_set: TaskSet, log: Callable[[str], None]) -> Profile:
    from kit.decode import generate
    from kit.format import task_tokens
    from kit.ttt import TTTResult, bucketed_batches, train_on_batches, training_sequences
    from kit.workers import Worker

    if not task_set.tasks:
        raise ValueError(f"{task_set.source}: no task to calibrate on")
    start = time.perf_counter()
    worker = Worker(config, log)
    load_s = time.perf_counter() - start
    backend, fmt = worker.backend, worker.fmt
    by_size = sorted(task_set.tasks, key=task_tokens)
    task = by_size[len(by_size) // 4]  # a smallish real task: calibration should take about a minute
    rng = task_rng(config.seed, task.id, "calibrate")
    # Train as a run would train this task: the memory plan's batch and checkpointing (on a GPU the backends load
    # checkpointed, and a checkpointed step costs 1.3-1.75x one without, which the plan runs where the batch fits).
    config, plan = worker.memory.plan_task(task, config)
    log(f"calibrating on {task.id}: training batch {plan['train_batch']}, checkpointing "
        f"{'on' if plan['checkpointing'] else 'off'}")

    tokens, seconds = [], []
    for batch_size in (max(1, config.ttt.batch_size // 2), config.ttt.batch_size):  # 2+ rows: compiled
        sequences = training_sequences(fmt, task, batch_size * (TRAIN_STEPS + 1), backend.max_length, rng)
        batches = bucketed_batches(sequences, batch_size, rng)
        settings = replace(config.ttt, converged_window=0)
        train_on_batches(backend, fmt, batches[:1], settings, None, TTTResult())  # warm-up: first-call allocations
        t0 = time.perf_counter()
        train_on_batches(backend, fmt, batches[1:], settings, None, TTTResult())
        per_step = (time.perf_counter() - t0) / len(batches[1:])
        tokens.append(float(np.mean([sum(len(ids) for ids, _ in b) for b in batches[1:]])))
        seconds.append(per_step)
    step_s, per_token = least_squares_line(tokens, seconds)

    prompt = fmt.encode_prompt(task.train, task.test_inputs[0])
    answer = fmt.encode_answer(task.train[0].output)
    backend.score(backend.prefill([prompt]), [0], [answer], fmt.grid_vocabulary)  # warm-up
    t0 = time.perf_counter()  # as infer.py scores: prompts once, then answers after them
    backend.score(backend.prefill([prompt] * 2), [0, 0, 1, 1], [answer] * 4, fmt.grid_vocabulary)
    prefill_rate = 2 * (len(prompt) + 2 * len(answer)) / (time.perf_counter() - t0)

    rows_list, per_decode_step = [], []
    for rows in DECODE_ROWS:
        t0 = time.perf_counter()
        outputs = generate(backend, [prompt] * rows, fmt.grid_vocabulary, fmt.eos_id, 64)
        elapsed = time.perf_counter() - t0 - rows * len(prompt) / prefill_rate
        per_decode_step.append(max(elapsed, 0.0) / max(1, max(len(o) for o in outputs)))
        rows_list.append(rows)
    decode_step_s, decode_row_s = least_squares_line(rows_list, per_decode_step)

    profile = Profile(device=str(backend.device), model=str(config.model or "embedded default"),
                      train_tokens_per_s=1.0 / per_token, train_step_s=step_s, prefill_tokens_per_s=prefill_rate,
                      decode_step_s=decode_step_s, decode_row_s=decode_row_s, model_load_s=load_s, calibrated=True)
    log(f"calibrated in {time.perf_counter() - start:.0f}s on {task.id}: training {profile.train_tokens_per_s:.0f} "
        f"tok/s + {step_s:.3f}s/step, prefill {prefill_rate:.0f} tok/s, decoding {decode_step_s * 1000:.1f}ms/step "
        f"+ {decode_row_s * 1000:.1f}ms/row, model load {load_s:.1f}s")
    return profile

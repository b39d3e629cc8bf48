"""Failures inside a task contained at the right depth, on a tiny random Llama: out of memory in decoding is
retried with half the decoding batch before the test input falls back; a merge that fails leaves inference on
the LoRA branch, with the answers the unmerged run gives."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_backend import save_tiny_llama

from kit.backend import load_backend
from kit.config import InferSettings, LoraSettings, RunConfig, TTTSettings
from kit.format import GridFormat
from kit.solve import solve_task
from kit.tasks import Pair, Task


def small_task() -> Task:
    """Output [[0]] whatever the input: a tiny model learns it in a few steps, so decoding yields grids."""
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 10, (2, 2), dtype=np.uint8) for _ in range(4)]
    return Task("small", [Pair(g, np.zeros((1, 1), np.uint8)) for g in inputs[:3]], [inputs[3]])


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return load_backend(save_tiny_llama(tmp_path_factory.mktemp("tiny")), "peft", LoraSettings(rank=4, alpha=8),
                        max_length=128, log=lambda _: None, dtype=torch.float32)


@pytest.fixture(scope="module")
def fmt(backend):
    return GridFormat.from_tokenizer(backend.tokenizer, "tiny")


def config(merge: bool = True) -> RunConfig:
    return RunConfig(ttt=TTTSettings(steps=30, batch_size=2, lr=1e-2, converged_window=0),
                     infer=InferSettings(augs=4, batch_size=4, merge_adapter=merge))


def test_out_of_memory_in_decoding_is_retried_with_half_the_batch(backend, fmt, monkeypatch):
    real_prefill, batches = backend.prefill, []

    def prefill(prompts):
        batches.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("simulated: decoding batch too large")
        return real_prefill(prompts)

    monkeypatch.setattr(backend, "prefill", prefill)
    record = solve_task(backend, fmt, small_task(), config())
    assert batches[0] == 4 and max(batches[1:]) == 2  # the retry decoded and scored in halves
    assert len(record.errors) == 1 and "retried with decoding batch 2" in record.errors[0]  # and no fallback
    assert record.candidates[0]  # the retry's candidates


def test_a_failing_merge_falls_back_to_the_lora_branch_with_the_same_answers(backend, fmt, monkeypatch):
    unmerged = solve_task(backend, fmt, small_task(), config(merge=False))

    @contextmanager
    def failing_merge():
        raise RuntimeError("simulated: cannot merge into these weights")
        yield

    monkeypatch.setattr(backend, "merged_adapter", failing_merge)
    record = solve_task(backend, fmt, small_task(), config(merge=True))
    assert len(record.errors) == 1 and record.errors[0].startswith("merge: RuntimeError")
    assert record.candidates[0] and [c["grid"] for c in record.candidates[0]] == \
        [c["grid"] for c in unmerged.candidates[0]]

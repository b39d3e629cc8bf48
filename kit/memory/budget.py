"""A worker's memory budget: per task, the training shape (batch, length, checkpointing) and the decoding batch that
keep the process under it, from the estimates (kit/memory/estimates.py) over the loaded model's dimensions and
what the process already holds (kit/memory/measure.py). The one place where the estimates meet a live backend."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
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
from kit.memory.measure import device_share, resident_memory
from kit.shapes import plausible_side
from kit.tasks import Task

# On a CPU glibc's heap keeps freed activations between live ones, so the resident set grows above the estimates
# (kit/memory/estimates.py) of what a task adds: measured with the default model 1.18x (d5c634a2, 4x710 tokens, no
# checkpointing, bf16), up to 2.6x in the estimates' own measurements. Plans on a CPU leave that room. Checkpointed
# training grew far more (4.3x at 2x710 in fp32: the recomputed activations), so it runs under the steady allocator
# (`heap_follows_tensors`, kit/memory/measure.py: 0.81x); the whole task under it would cost twice the time
# (bench/cpu_allocator.py), so workers otherwise trim the heap before each task (`trim_cpu_heap`).
CPU_HEAP_SLACK = 2.6


class MemoryBudget:
    """The memory a worker may use, and per task the training shape and decoding batch that stay inside it
    (kit/memory/estimates.py's estimates from the model's dimensions and what the process already holds)."""

    def __init__(self, backend: Any, budget: int | None, log: Callable[[str], None], share: int = 1):
        base = backend.model.get_base_model()
        self.backend = backend
        self.lora_parameters = sum(p.numel() for p in backend.trainable_parameters())
        # The frozen weights are not estimated: they are in the resident memory measured before each task, as
        # stored (bf16, fp32 or packed 4-bit), so the plan knows packed weights without a model of them.
        self.dims = ModelDims.from_config(base.config, backend.dtype.itemsize)
        self.merged_bytes = backend.merged_weight_bytes()
        # Eager attention holds batch x heads x length^2 scores: decoding always (its kernel), training below
        # the backend's `sdpa_from` when it has one.
        self.scores = uses_eager_attention(backend.decode_attention)
        self.device = backend.device.type
        self.budget = budget or device_share(self.device, share)
        given = "given" if budget else f"1/{share} of the device" if share > 1 and self.device == "cuda" else \
            "free on the device"
        log(f"memory budget {format_size(self.budget)} ({given}), "
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
        answer = max(answer_budget(plausible_side(task, g)) for g in task.test_inputs)
        decode_length = min(self.backend.max_length, max(sequence_tokens(task.train, g) for g in task.test_inputs)
                            + answer)
        # The prefill's kernel follows its length (Backend.attention_for); scoring's answer passes run the decoding
        # kernel, over the whole cache.
        shape = (decode_length, uses_eager_attention(self.backend.attention_for(decode_length)),
                 answer if self.scores else 0)
        batch = decoding_batch(plannable, resident, self.dims, config.infer.batch_size, *shape)
        if batch == 0:
            raise MemoryError(f"decoding {decode_length} tokens does not fit {format_size(self.budget)}")
        # Merged weights for inference (Backend.merged_adapter) only where their copy costs no decoding rows.
        merge = config.infer.merge_adapter and not self.backend.quantized and batch == decoding_batch(
            plannable, resident + self.merged_bytes, self.dims, batch, *shape)
        decoding = resident + self.merged_bytes * merge + decoding_bytes(self.dims, batch, *shape)
        record = {"budget": self.budget, "resident": resident, "train_batch": ttt.batch_size,
                  "train_length": ttt.max_length or longest, "checkpointing": bool(plan and plan.checkpointing),
                  "decode_batch": batch, "merged": merge,
                  "estimated_peak": max(decoding, plan.estimated_bytes if plan else 0)}
        return replace(config, ttt=ttt, infer=replace(config.infer, batch_size=batch, merge_adapter=merge)), record

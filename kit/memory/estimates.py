"""Memory estimates for per-task LoRA training and decoding, and the plans built on them. Pure arithmetic on a
model's dimensions: no torch, no /proc (kit/memory/measure.py measures).

A task's longest sequences and the batch size decide whether a training step fits: the saved activations
grow with batch x length, and eager attention's probabilities with batch x heads x length^2 per layer. Rather
than find out by an out-of-memory error in the middle of a run, the worker asks `plan_training` for the
batch size, the longest sequence and whether to recompute activations (gradient checkpointing) that keep the
peak under the budget, and `decoding_batch` for how many sequences to decode at once.

The estimates are closed-form sums over the tensors a Llama-style decoder keeps for backward, with constants
calibrated on measured peaks (SmolLM2-135M, bf16 frozen weights + fp32 LoRA under bf16 autocast, eager
attention, CPU): they are meant to be upper bounds within about 1.5x.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

# --- sizes -------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes from "14GiB", "512MiB", "16GB", "2.5G", "1500000000". Binary units carry an "i" (GiB = 2^30);
    the others are decimal (GB = G = 10^9), as in the SI and in what cloud vendors quote for GPUs."""
    match = _SIZE.fullmatch(str(text).strip())
    if match is None or (match[3] and not match[2]):
        raise ValueError(f"bad size {text!r}: expected a number with an optional unit such as 512MiB, 16GB, 2.5G")
    value, power = float(match[1]), _POWERS[match[2].lower()]
    return int(round(value * (1024 if match[3] else 1000) ** power))


def format_size(size: float) -> str:
    """A byte count for logs: "1.50 GiB"."""
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


# --- the model's shape -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """What the memory estimates need to know about a decoder-only transformer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    dtype_bytes: int  # bytes per element of the compute dtype (2 for bf16/fp16, 4 for fp32)
    head_dim: int = 0  # 0: hidden // heads (most models; some, like Qwen3 and Gemma, set their own)

    @property
    def attention_width(self) -> int:
        """Width of the queries (and of keys/values once repeated for grouped-query attention)."""
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_width(self) -> int:
        """Width of the keys (and of the values) that the KV cache stores per token and layer."""
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @classmethod
    def from_config(cls, config: Any, dtype_bytes: int) -> ModelDims:
        """From a transformers config object (or its dict); multimodal configs use their text part."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        fields = config if isinstance(config, dict) else vars(config)
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
                   if fields.get(k) is None]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}: cannot estimate its memory")
        heads = int(fields["num_attention_heads"])
        return cls(layers=int(fields["num_hidden_layers"]), hidden=int(fields["hidden_size"]),
                   intermediate=int(fields["intermediate_size"]), heads=heads,
                   kv_heads=int(fields.get("num_key_value_heads") or heads), dtype_bytes=int(dtype_bytes),
                   head_dim=int(fields.get("head_dim") or 0))


def uses_eager_attention(kernel: str | None) -> bool:
    """Whether an attention kernel (a transformers `attn_implementation`) materialises the batch x heads x
    length^2 scores (eager, and the kit's eager_grouped), or not (sdpa's flash and memory-efficient kernels,
    flash_attention_2): the `attention_scores` argument of the estimates."""
    return kernel is None or kernel.startswith("eager")


# --- estimates ---------------------------------------------------------------------------------------------

# Bytes. The per-element terms below follow the tensors autograd saves (checked with saved-tensor hooks); the
# overheads and the margin were fitted on 19 measured training peaks and 12 decoding peaks of SmolLM2-135M
# (batch 1-8, 256-2048 tokens, with and without checkpointing): estimate / measured = 1.02 to 1.5.
FP32 = 4
NORM_SAVED = 2 * FP32  # two RMSNorms per layer keep their input upcast to fp32 for backward
LORA_STATE_BYTES = 12  # per LoRA parameter: fp32 grad + two fp32 AdamW moments
STEP_OVERHEAD = 96 * MIB  # allocator slack, oneDNN scratch, the autocast weight cache, small tensors
DECODE_OVERHEAD = 40 * MIB
ESTIMATE_MARGIN = 1.2  # what the sums miss: measured peaks ran up to 1.17x the sums without it


def layer_saved_bytes(dims: ModelDims, batch: int, length: int, attention_scores: bool = True) -> int:
    """What one decoder layer keeps for backward when LoRA adapts all seven projections.

    Per token: the fp32 inputs of both norms; a compute-dtype copy of the input of each LoRA A matrix (PEFT
    casts the input to the adapter's fp32 and autocast casts it back, a fresh tensor per projection: q, k, v,
    gate, up take the hidden state, o the attention output, down the MLP product); the rotated queries and the
    keys and values repeated to all heads (saved by the attention matmuls); gate, SiLU(gate) and up (saved by
    the SiLU and the product). Per attention score (eager): the fp32 softmax output and its compute-dtype cast.
    """
    d, tokens = dims.dtype_bytes, batch * length
    per_token = (NORM_SAVED * dims.hidden
                 + d * (5 * dims.hidden + dims.attention_width + dims.intermediate)  # LoRA input copies
                 + d * 3 * dims.attention_width  # q rotated, k and v repeated
                 + d * 3 * dims.intermediate)  # gate, silu(gate), up
    return tokens * per_token + _scores(dims, batch, length, attention_scores) * (FP32 + d)


def layer_transient_bytes(dims: ModelDims, batch: int, length: int, attention_scores: bool = True) -> int:
    """The short-lived buffers of the busiest moment inside one layer, beyond what it saves (no checkpointing).

    Per score: the softmax's fp32 input while it runs, or in backward the fp32 gradient of the probabilities.
    Per token: the fp32 copy PEFT makes of a LoRA input, and the gradients flowing through the MLP.
    """
    d, tokens = dims.dtype_bytes, batch * length
    per_token = FP32 * max(dims.hidden, dims.intermediate) + 4 * d * (dims.intermediate + dims.hidden)
    return tokens * per_token + _scores(dims, batch, length, attention_scores) * (FP32 + d)


def recompute_peak_bytes(dims: ModelDims, batch: int, length: int, attention_scores: bool = True) -> int:
    """The busiest moment of a checkpointed layer: its attention's backward, after recomputation.

    PyTorch's non-reentrant checkpoint frees each recomputed tensor once backward has used it, so by then the
    MLP's are gone. Per token: the fp32 norm input, the q/k/v LoRA input copies, the rotated queries and the
    repeated keys and values. Per score: the fp32 softmax output, the fp32 gradient of the probabilities and
    the softmax's gradient (calibrated: 10 to 14 bytes per score were measured).
    """
    d, tokens = dims.dtype_bytes, batch * length
    per_token = FP32 * dims.hidden + d * (3 * dims.hidden + 3 * dims.attention_width)
    return tokens * per_token + _scores(dims, batch, length, attention_scores) * 3 * FP32


def _scores(dims: ModelDims, batch: int, length: int, attention_scores: bool) -> int:
    """Elements of one layer's eager attention scores (0 for kernels that never hold them)."""
    return batch * dims.heads * length * length if attention_scores else 0


def training_bytes(dims: ModelDims, batch: int, length: int, checkpointing: bool, lora_parameters: int,
                   attention_scores: bool = True) -> int:
    """Estimated peak memory that one LoRA training step (forward, backward, AdamW) adds to the resident model.

    Without checkpointing every layer keeps its activations until backward reaches it; with it, each layer
    keeps only its input and one layer at a time is recomputed. The LM head runs only on the labelled
    positions over a ~12-token vocabulary, so logits are negligible. The LoRA's fp32 gradients and AdamW
    moments are alive during backward from the second step on. `attention_scores` False: flash or
    memory-efficient attention, which never holds the length^2 scores.
    """
    if batch < 1 or length < 1:
        raise ValueError(f"batch {batch} and length {length} must be positive")
    if checkpointing:
        inputs = dims.layers * batch * length * dims.hidden * dims.dtype_bytes
        activations = inputs + recompute_peak_bytes(dims, batch, length, attention_scores)
    else:
        activations = (dims.layers * layer_saved_bytes(dims, batch, length, attention_scores)
                       + layer_transient_bytes(dims, batch, length, attention_scores))
    mask = batch * length * length * dims.dtype_bytes if attention_scores else 0  # the 4D additive causal mask
    total = activations + mask + LORA_STATE_BYTES * lora_parameters + STEP_OVERHEAD
    return int(total * ESTIMATE_MARGIN)


def decoding_bytes(dims: ModelDims, batch: int, length: int, attention_scores: bool = True,
                   answer_tokens: int = 0) -> int:
    """Estimated peak memory that decoding and scoring `batch` sequences of `length` tokens add to the resident
    model; no grad, so one layer's activations at a time.

    The KV cache of every layer twice (the prompts' prefill, kept for scoring, and the decoding cache that copies
    it and grows a token per step; scoring's caches gathered from the prefill are no larger), and the prefill's
    busiest layer: its hidden and MLP activations and, where the prefill runs eager attention
    (`attention_scores`), its 4D mask and per score the masked scores, their fp32 copy and the fp32 softmax
    output (about 10.8 bytes per score were measured). A prefill on a flash kernel holds none of that, but the
    scoring passes after it still run eager over the cache: `answer_tokens` queries a row against `length` keys,
    scores and mask alike (0: scoring holds no scores either).
    """
    if batch < 1 or length < 1:
        raise ValueError(f"batch {batch} and length {length} must be positive")
    d, tokens = dims.dtype_bytes, batch * length
    kv = 2 * (2 * dims.layers * tokens * dims.kv_width * d)
    per_token = FP32 * dims.hidden + d * (2 * dims.hidden + 2 * dims.attention_width + 3 * dims.intermediate)
    queries = length if attention_scores else min(answer_tokens, length)
    scores = batch * dims.heads * queries * length * (2 * FP32 + d)
    mask = batch * queries * length * d
    return int((kv + tokens * per_token + scores + mask + DECODE_OVERHEAD) * ESTIMATE_MARGIN)


# --- plans -------------------------------------------------------------------------------------------------

MIN_LENGTH = 256  # shorter sequences would drop most demonstrations of a typical ARC task


@dataclass(frozen=True)
class MemoryPlan:
    """How to train one task inside the budget."""

    batch_size: int
    max_length: int
    checkpointing: bool
    estimated_bytes: int  # resident + training_bytes: the expected peak of the whole process


def plan_training(budget: int, resident: int, dims: ModelDims, batch_size: int, max_length: int,
                  lora_parameters: int, attention_scores: bool = True, flash_from: int | None = None,
                  min_length: int = MIN_LENGTH) -> MemoryPlan | None:
    """The first plan whose estimated peak fits the budget, in order of preference: the configured batch and
    length without checkpointing (fastest); with checkpointing (recomputes each layer's forward, same training); halved
    batches down to 1 (fewer examples per step); halved lengths down to `min_length` (drops demonstrations).
    None when not even one sequence of `min_length` tokens fits. `flash_from`: passes from that many tokens on
    hold no scores (a backend that switches kernel by length); a plan then fits the worst batch up to its
    length, which may be one just below `flash_from` that holds them."""
    for batch, length, checkpointing in _candidates(batch_size, max_length, min_length):
        shapes = [(length, attention_scores)]
        if attention_scores and flash_from is not None and length >= flash_from:
            shapes = [(length, False), (flash_from - 1, True)]
        peak = resident + max(training_bytes(dims, batch, n, checkpointing, lora_parameters, scores)
                              for n, scores in shapes)
        if peak <= budget:
            return MemoryPlan(batch, length, checkpointing, peak)
    return None


def _candidates(batch_size: int, max_length: int, min_length: int) -> Iterator[tuple[int, int, bool]]:
    for length in _halvings(max_length, min(min_length, max_length)):
        for batch in _halvings(batch_size, 1):
            yield batch, length, False
            yield batch, length, True


def _halvings(start: int, floor: int) -> list[int]:
    """start, start/2, ... while above floor, then floor: [2048, 1024, 512, 256] or [6, 3, 1]."""
    values = [start]
    while values[-1] // 2 > floor:
        values.append(values[-1] // 2)
    if values[-1] > floor:
        values.append(floor)
    return values


def decoding_batch(budget: int, resident: int, dims: ModelDims, batch_size: int, length: int,
                   attention_scores: bool = True, answer_tokens: int = 0) -> int:
    """The largest batch up to `batch_size` whose decoding and scoring of `length`-token sequences fits the
    budget (`decoding_bytes`); 0 if even one sequence does not."""
    for batch in range(batch_size, 0, -1):
        if resident + decoding_bytes(dims, batch, length, attention_scores, answer_tokens) <= budget:
            return batch
    return 0

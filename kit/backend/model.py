"""`Backend`: a causal LM with one LoRA adapter attached at load time and re-initialised per task, behind the small
interface the kit uses (adapter operations from kit/backend/adapter.py, likelihoods from kit/backend/likelihood.py,
loading in kit/backend/load.py). This module owns the rest of the model's state: which parameters train, the
attention kernel by pass and length, gradient checkpointing, compilation of the training pass and the modes.

Under bf16 or fp16 autocast, PEFT's cast of each LoRA input to fp32 is switched off (autocast casts it straight back).
`compile_training` compiles each decoder layer once for the training pass (regional compilation: one graph serves
all layers, all batch sizes from 2 and all lengths); scoring and decoding always run eagerly, since the KV cache
would recompile a graph per step. On a CPU the attention kernel follows the length (`attention_for`).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from kit import attention
from kit.backend import adapter
from kit.backend.head import Head, check
from kit.backend.likelihood import Likelihoods
from kit.backend.masks import Windows
from kit.format import IGNORE

# On a CPU, eager attention is the faster kernel for short passes and torch's flash kernel (sdpa, causal, no mask)
# for long ones, where eager's batch x heads x length^2 fp32 scores swamp the memory traffic: SmolLM2-135M training
# steps of 4 x 316 tokens took 2.9 s eager vs 3.3 s sdpa, 4 x 454 about even, 4 x 710 13-17 s eager vs 8-9 s sdpa.
CPU_SDPA_FROM = 512  # tokens

HALF = (torch.bfloat16, torch.float16)  # compute dtypes that run under autocast (the LoRA weights stay fp32)


class Backend(Likelihoods):
    """A causal LM with one LoRA adapter attached at load time and re-initialised per task."""

    name = "base"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                 max_length: int, seed: int) -> None:
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self._base = base = model.get_base_model()
        self.max_length = min(max_length, getattr(base.config, "max_position_embeddings", max_length))
        cpu = device.type == "cpu"
        self._loaded_attention = base.config._attn_implementation
        # Decoding steps and scoring's answer passes (a padding mask, so no flash kernel on a CPU) run eager attention
        # reading the grouped KV cache in place (kit.attention) where it reproduces the model's own eager attention.
        # Prefills are right-padded passes like training's, with the kernel `attention_for` their length.
        if cpu:
            self.decode_attention = attention.register() if attention.reproduces(base) else "eager"
        else:
            self.decode_attention = self._loaded_attention
        # None: the loaded kernel at every length (GPUs, and models without sdpa)
        self.sdpa_from = CPU_SDPA_FROM if cpu and getattr(base, "_supports_sdpa", False) else None
        self._set_attention(self.decode_attention)
        self._decoder = base.get_decoder()
        self._head = Head.of(base)
        self._windows = Windows.of(base)
        self._pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self._lora_layers = adapter.lora_layers(model)
        self._token_layers = adapter.token_layers(model)
        self._lora = adapter.lora_weights(self._lora_layers) + adapter.token_rows(self._token_layers)
        if not self._lora:
            raise ValueError(f"{type(model).__name__}: no LoRA layers were attached")
        lora_ids = {id(p) for p in self._lora}
        for p in model.parameters():
            p.requires_grad_(id(p) in lora_ids)
        if dtype in HALF:  # autocast computes LoRA in the half dtype: PEFT's fp32 input cast is a wasted copy
            for layer in self._lora_layers:
                layer.cast_input_dtype_enabled = False
        self.quantized = adapter.packed(self._lora_layers)  # 4-bit bases: no merge, inference on the branch
        self.compiled = False  # training runs through compiled decoder layers (`compile_training`)
        self.reset_lora(seed)
        self.eval()

    # --- adapter (kit/backend/adapter.py) ------------------------------------------------------------------

    def reset_lora(self, seed: int) -> None:
        """A fresh adapter in place: A ~ kaiming-uniform (as PEFT) from `seed` alone, B = 0, trained token rows
        back to the base's, no grads left."""
        adapter.reset(self._lora_layers, seed)
        adapter.reset_token_rows(self._token_layers)

    @contextmanager
    def merged_adapter(self) -> Iterator[None]:
        """Inference through merged weights instead of the LoRA branch; the base is given back untouched."""
        with adapter.merged(self.model, self._lora_layers):
            yield

    def merged_weight_bytes(self) -> int:
        """What `merged_adapter` adds at most (for the memory plan; nothing where it cannot merge)."""
        return 0 if self.quantized else adapter.merged_weight_bytes(self._lora_layers)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._lora)

    def check_head(self, where: str) -> None:
        """Refuse a model whose own logits the kit's LM head (kit/backend/head.py) does not reproduce."""
        with self._autocast():  # as every pass runs: the LoRA branch takes half inputs only under autocast
            check(self.model, self._decoder, self._head, where)

    # --- training ------------------------------------------------------------------------------------------

    @property
    def checkpointing(self) -> bool:
        """Whether the decoder layers recompute their activations (transformers' checkpointing)."""
        return bool(getattr(self._base, "is_gradient_checkpointing", False))

    def set_checkpointing(self, on: bool) -> None:
        """Gradient checkpointing of the decoder layers: recompute activations in the backward pass instead of
        keeping them (the memory plan turns it on when a task's batch would not fit otherwise)."""
        if on == self.checkpointing:
            return
        if on:
            self._base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self._base.gradient_checkpointing_disable()

    def compile_training(self) -> float:
        """Compile the decoder layers for training (torch.compile, dynamic shapes) and pay the compilation now,
        with one step on made-up 2-row batches per attention kernel, rather than inside a task's deadline;
        returns its seconds. One-row batches and grad-free passes stay eager (each would cost another
        compilation). Raises what the compiler raised (no C++ compiler, say), leaving the backend eager."""
        start = time.perf_counter()
        try:
            for layer in self._decoder.layers:
                layer.compile(dynamic=True)
            self.compiled = True
            self.train()
            for length in self._warmup_lengths():
                ids = (torch.arange(2 * length) % self._head.rows).reshape(2, length)
                labels = ids.clone()
                labels[:, : length // 2] = IGNORE
                self.loss(ids, labels, torch.ones_like(ids)).backward()
        except Exception:
            self.compiled = False
            raise
        finally:
            for p in self._lora:
                p.grad = None
            self.eval()
        return time.perf_counter() - start

    def _warmup_lengths(self) -> list[int]:
        """One length per attention kernel a training pass may use. Odd, so that no model dimension equals it:
        a size shared with a weight would be traced as the same symbol, tying the graph to that length."""
        short = 41 if self.sdpa_from is None else max(3, min(41, self.sdpa_from - 1))
        lengths = [short - (short % 2 == 0)] + ([self.sdpa_from | 1] if self.sdpa_from else [])
        return [n for n in lengths if n <= self.max_length]

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    # --- kernels and numerics ------------------------------------------------------------------------------

    def attention_for(self, length: int) -> str:
        """The attention kernel of a right-padded pass without cache (training, prompt prefills) over `length`
        tokens (CPU_SDPA_FROM)."""
        if self.sdpa_from is None:
            return self._loaded_attention
        return "sdpa" if length >= self.sdpa_from else "eager"

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype in HALF)

    def loss_scaler(self) -> torch.amp.GradScaler:
        """A fresh gradient scaler for one training run: active in fp16, whose range small gradients underflow
        (a T4 has no bf16), a no-op otherwise. Shared by TTT and pretuning through `kit.ttt.train_step`."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def _set_attention(self, kernel: str) -> None:
        if self._base.config._attn_implementation != kernel:
            self._base.set_attn_implementation(kernel)

    def _compiled_if(self, wanted: bool) -> AbstractContextManager:
        """Compiled layers where `wanted` (and compiled), else eager: a graph-free stance, not a recompilation."""
        return nullcontext() if self.compiled and wanted else torch.compiler.set_stance("force_eager")

"""The LoRA adapter's operations on an attached peft model: find its layers, reset it in place per task, and
swap merged weights in for inference. Kept apart from loading and likelihoods because this is where a base that
cannot be merged into (quantized weights) changes what the kit may do."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from kit.config import ALL_LINEAR


def target_names(model: torch.nn.Module, wanted: Sequence[str]) -> list[str]:
    """The projection names LoRA adapts in `model` (before the adapter is attached): for ALL_LINEAR every linear
    layer of the decoder blocks by its name (Llama's q/k/v/o/gate/up/down, Phi-3's fused qkv_proj and
    gate_up_proj), else the names asked for, each of which must name one."""
    present = sorted({name.rsplit(".", 1)[-1] for name, module in model.get_decoder().layers.named_modules()
                      if isinstance(module, torch.nn.Linear)})
    if tuple(wanted) == (ALL_LINEAR,):
        return present
    missing = [name for name in wanted if name not in present]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not linear layers of {type(model).__name__}'s decoder "
                         f"blocks, which has {present} (or use {ALL_LINEAR})")
    return list(wanted)


def token_targets(model: torch.nn.Module, ids: Sequence[int]) -> dict[str, list[int]]:
    """peft's `trainable_token_indices` for training the rows of `ids`: the input embedding's, and the LM head's
    where it has its own weight (peft makes a tied head follow the embedding)."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[id(embedding)]: list(ids)}
    if head is not None and head.weight is not embedding.weight:
        targets[names[id(head)]] = list(ids)
    return targets


def token_layers(model: torch.nn.Module) -> list[Any]:
    """peft's trainable-token layers that hold their own rows (a tied head's layer shares the embedding's)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and m.tied_adapter is None]


def token_rows(layers: list[Any]) -> list[torch.nn.Parameter]:
    """The trained rows of every active trainable-token adapter, kept in fp32 like the LoRA matrices (peft makes
    them in the base's dtype; its forward casts them back)."""
    rows = []
    for layer in layers:
        for name in layer.active_adapters:
            delta = layer.trainable_tokens_delta[name]
            delta.data = delta.data.float()
            rows.append(delta)
    return rows


@torch.no_grad()
def reset_token_rows(layers: list[Any]) -> None:
    """Trained token rows back to the base's own (what peft starts from), no grads left."""
    for layer in layers:
        for name in layer.active_adapters:
            delta = layer.trainable_tokens_delta[name]
            delta.copy_(layer.trainable_tokens_original[name])
            delta.grad = None


def lora_layers(model: torch.nn.Module) -> list[Any]:
    """The peft LoRA layers of a model (each wraps one adapted projection)."""
    from peft.tuners.lora import LoraLayer

    return [m for _, m in model.named_modules() if isinstance(m, LoraLayer)]


def packed(layers: list[Any]) -> bool:
    """Whether the adapted weights are packed (bitsandbytes' 4-bit: integer storage), which cannot be merged into."""
    return any(not layer.get_base_layer().weight.dtype.is_floating_point for layer in layers)


def lora_weights(layers: list[Any]) -> list[torch.nn.Parameter]:
    """Every active adapter's A and B matrices: the only parameters TTT trains."""
    return [m[name].weight for layer in layers for name in layer.active_adapters for m in (layer.lora_A, layer.lora_B)]


@torch.no_grad()
def reset(layers: list[Any], seed: int) -> None:
    """A fresh adapter in place: A ~ kaiming-uniform (as PEFT) from `seed` alone, B = 0, no grads left."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        for name in layer.active_adapters:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            fresh = torch.empty(a.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            a.copy_(fresh)
            b.zero_()
            a.grad = b.grad = None


@contextmanager
def merged(model: torch.nn.Module, layers: list[Any]) -> Iterator[None]:
    """Inference through merged weights W + s*B*A instead of W plus the LoRA branch: one matmul per projection
    instead of three, a third of the kernels per decoding step. The merged weights are new tensors swapped in (an
    untrained adapter, B = 0, swaps nothing); the base's own tensors are put back on exit, untouched (merging in
    place and subtracting afterwards would drift in bf16). Packed weights are refused: their storage is not W; so
    are trained token rows (disabling the adapter would drop them)."""
    if packed(layers):
        raise ValueError("the base's weights are packed (4-bit): inference runs through the LoRA branch")
    if token_layers(model):
        raise ValueError("the adapter trains token rows: inference runs through the adapter")
    swapped = []
    try:
        with torch.no_grad():
            for layer in layers:
                names = [n for n in layer.active_adapters if bool(layer.lora_B[n].weight.any())]
                if names:
                    base = layer.get_base_layer()
                    delta = sum(layer.get_delta_weight(n).float() for n in names)
                    swapped.append((base, base.weight))
                    base.weight = torch.nn.Parameter((base.weight.float() + delta).to(base.weight.dtype),
                                                     requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, weight in swapped:
            base.weight = weight


def merged_weight_bytes(layers: list[Any]) -> int:
    """What `merged` adds at most: a copy of every adapted weight (for the memory plan)."""
    return sum(layer.get_base_layer().weight.nbytes for layer in layers)

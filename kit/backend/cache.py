"""Keys and values kept between passes: a prompt's prefill (`Prefix`) and the cache rows that scoring and decoding
run on. Two cache forms exist: transformers' `DynamicCache` and the per-layer (keys, values) tuples that unsloth's
fast forward returns and indexes; a cache goes back to the decoder in the form it came out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Prefix:
    """Prompts run once (`Backend.prefill`), one row each, right-padded: each layer's keys and values, the last
    real position's hidden state (it predicts an answer's first token), the lengths and the padding mask."""
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    last_hidden: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    legacy: bool = False  # the decoder returned (keys, values) tuples (unsloth's fast forward) and takes them back


def layer_keys_values(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) from a transformers Cache, or from the tuples unsloth's fast forward returns."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(keys, values) for keys, values, *_ in cache]


def cache_rows(keys_values: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor | None = None,
               legacy: bool = False) -> Any:
    """A cache holding those rows (None: all) of each layer's keys and values, as copies: the given tensors stay
    intact. A transformers DynamicCache, or with `legacy` the per-layer (keys, values) tuples that unsloth's fast
    forward returns and indexes."""
    from transformers import DynamicCache

    picked = [(k, v) if rows is None else (k[rows], v[rows]) for k, v in keys_values]
    if legacy:
        return tuple((k.clone(), v.clone()) if rows is None else (k, v) for k, v in picked)
    cache = DynamicCache()
    for index, (keys, values) in enumerate(picked):
        cache.update(keys, values, index)  # concatenated onto an empty tensor: a copy
    return cache


def index_in(ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Position of each id within `allowed` (labels remapped into a restricted vocabulary)."""
    match = ids[:, None] == allowed[None, :]
    if not bool(match.any(1).all()):
        missing = sorted(set(ids[~match.any(1)].tolist()))
        raise ValueError(f"label ids {missing} are not in the restricted vocabulary")
    return match.int().argmax(1)


def until_first(row: np.ndarray, stop: int) -> np.ndarray:
    """The row up to and including the first `stop`, or all of it."""
    hits = np.flatnonzero(row == stop)
    return row[: hits[0] + 1] if len(hits) else row

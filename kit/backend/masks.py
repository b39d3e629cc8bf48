"""Attention masks for passes on a cache of right-padded prompts, for models with sliding-window layers.

Scoring and decoding run on the keys and values of right-padded prompts: a row's new tokens sit in cache slots
past the padding, so their slot index is not their position. transformers builds a sliding window from slot
indices, which for every row but the longest would reach back too few real tokens, and its own cache keeps only
a window's worth of keys per sliding layer, counted in slots too. So for such models (Mistral, Gemma-3, Phi-3
long-context, any config with a `sliding_window`) the kit keeps every layer's keys in full (`full_cache`) and
passes the mask itself: key j is seen by query i when it is a real token, not after it, and (on a sliding layer)
fewer than `window` positions before it, positions counted in real tokens. Models without a window get the plain
2-D padding mask, as always.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' names of the layer types


@dataclass(frozen=True)
class Windows:
    """The decoder's sliding window and whether full-attention layers sit beside the sliding ones."""
    window: int
    mixed: bool

    @classmethod
    def of(cls, model: torch.nn.Module) -> Windows | None:
        """None for a model without sliding-window layers."""
        config = model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        if not window or getattr(config, "use_sliding_window", True) is False:
            return None
        types = set(getattr(config, "layer_types", None) or [SLIDING])
        if SLIDING not in types:
            return None
        return cls(int(window), mixed=len(types) > 1)

    def mask(self, padding: torch.Tensor, queries: int, dtype: torch.dtype) -> Any:
        """The attention mask for the last `queries` slots of a pass whose keys are the slots of `padding`
        (batch x slots, 1 for a real token): one additive 4-D mask, or one per layer type where they differ."""
        position = padding.cumsum(1) - 1  # of each real slot, in real tokens
        query, key = position[:, -queries:, None], position[:, None, :]
        seen = (padding[:, None, :] > 0) & (key <= query)
        sliding = additive(seen & (query - key < self.window), dtype)
        return {SLIDING: sliding, FULL: additive(seen, dtype)} if self.mixed else sliding


def additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean batch x queries x keys mask as the additive batch x 1 x queries x keys one attention adds."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


def full_cache() -> Any:
    """An empty cache whose every layer keeps all its keys (no sliding truncation)."""
    from transformers import DynamicCache

    return DynamicCache()

"""Search over the grid vocabulary on a prefilled KV cache: the policies that turn a prompt's prefix into answers
(the backend supplies prefill, the one-token step and the head; kit/infer.py decides what to decode).

`greedy`: the most likely token at every step, one answer per prompt, finished rows leaving the batch.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kit.backend.cache import Prefix, cache_rows, layer_keys_values, until_first

if TYPE_CHECKING:
    from kit.backend import Backend
    from kit.backend.likelihood import Ids

GiveUp = Callable[[np.ndarray], np.ndarray]  # each step's token of every row -> rows that can no longer be a grid


def generate(backend: Backend, prompts: Sequence[np.ndarray], vocab: Ids, eos_id: int, max_new_tokens: int,
             deadline: float | None = None, give_up: GiveUp | None = None) -> list[np.ndarray]:
    """Greedy continuation of each prompt over `vocab` only (`prefill`, then `greedy`)."""
    return greedy(backend, backend.prefill(prompts), vocab, eos_id, max_new_tokens, deadline, give_up)


def greedy(backend: Backend, prefix: Prefix, vocab: Ids, eos_id: int, max_new_tokens: int,
           deadline: float | None = None, give_up: GiveUp | None = None) -> list[np.ndarray]:
    """Greedy continuation of each prefilled prompt over `vocab` only, one token per row and step on the KV
    cache (the prefix stays intact, for scoring).

    Each row ends at its first `eos_id` (kept in its output) or after `max_new_tokens`, also limited so that no
    sequence exceeds the backend's `max_length`, or when `deadline` (time.monotonic()) passes, or where `give_up`
    (called with each step's token of every row) flags it: rows cut off by the deadline or given up on have no
    EOS. Finished rows leave the batch.
    """
    allowed = backend.vocab_ids(vocab)
    if not bool((allowed == eos_id).any()):
        raise ValueError(f"eos_id {eos_id} is not in the decoding vocabulary")
    device = allowed.device
    count = len(prefix.lengths)
    budget = min(max_new_tokens, backend.max_length - prefix.mask.shape[1])
    head = backend.head_rows(allowed)
    rows = torch.arange(count, device=device)  # the prompt of each row still being decoded
    tokens = torch.full((count, budget), eos_id, dtype=torch.long, device=device)
    given_up = np.zeros(count, np.int64)  # tokens kept of a row given up on, 0 for the others
    mask, positions, hidden = prefix.mask, prefix.lengths[:, None], prefix.last_hidden
    cache, taken = cache_rows(prefix.keys_values, legacy=prefix.legacy), 0
    with backend.decoding():
        for step in range(budget):
            chosen = allowed[backend.logits(hidden, head).argmax(-1)]
            tokens[rows, step] = chosen
            taken = step + 1
            done = chosen == eos_id
            if give_up is not None:
                hopeless = torch.from_numpy(give_up(tokens[:, step].cpu().numpy())).to(device)[rows]
                given_up[rows[hopeless & ~done].cpu().numpy()] = taken
                done |= hopeless
            if bool(done.all()) or step + 1 == budget or (deadline is not None and time.monotonic() >= deadline):
                break
            if bool(done.any()):  # finished rows leave the batch: the others' steps get cheaper
                keep = (~done).nonzero()[:, 0]
                rows, chosen, positions, mask = rows[keep], chosen[keep], positions[keep], mask[keep]
                cache = cache_rows(layer_keys_values(cache), keep, prefix.legacy)
            mask = F.pad(mask, (0, 1), value=1)
            cache, hidden = backend.step(chosen, mask, positions, cache)
            positions = positions + 1
    generated = tokens[:, :taken].cpu().numpy()
    return [row[:kept] if kept else until_first(row, eos_id) for row, kept in zip(generated, given_up)]

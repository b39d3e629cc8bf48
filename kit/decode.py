"""Search over the grid vocabulary on a prefilled KV cache: the policies that turn a prompt's prefix into answers
(the backend supplies prefill, the one-token step and the head; kit/infer.py decides what to decode).

`greedy`: the most likely token at every step, one answer per prompt, finished rows leaving the batch.
`dfs`: every answer whose probability stays at or above a threshold, depth first with the greedy path first (so
the greedy answer is always among them), branches pruned as soon as they can no longer be a grid of the
plausible side (`format.grid_step`), at most `max_answers` per prompt, stopping at the deadline with what it has.
The ARChitects and NVARC decode this way (thresholds 0.09-0.2): the right answer is often the second or third
most likely, and a product of experts over views can pick it only if it was decoded.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kit.backend.cache import Prefix, cache_rows, layer_keys_values, until_first
from kit.format import GridFormat, grid_step
from kit.grids import MAX_SIDE

if TYPE_CHECKING:
    from kit.backend import Backend
    from kit.backend.head import Head
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


@dataclass
class Answer:
    """A decoded continuation (its EOS included) and its log-probability under the prompt, over the vocabulary."""
    tokens: np.ndarray
    log_prob: float
    greedy: bool = False  # the greedy path's answer


@dataclass
class _Node:
    """A path of the search: tokens after the prompt, its log-probability, its grid state, whether it is the
    greedy path."""
    tokens: list[int]
    log_prob: float
    state: tuple[np.ndarray, np.ndarray, np.ndarray]  # (width, line, lines) as format.grid_step keeps them
    greedy: bool


def dfs(backend: Backend, prefix: Prefix, fmt: GridFormat, threshold: float, max_new_tokens: int,
        max_answers: int, deadline: float | None = None, max_side: int = MAX_SIDE) -> list[list[Answer]]:
    """Per prefilled prompt, every answer over the grid vocabulary whose probability is at least `threshold`,
    plus the greedy answer whatever its probability (when it ends within `max_new_tokens`), as at most
    `max_answers` answers, greedy first, the others in the order found (most likely branch first).

    A path is extended only while its probability stays at or above the threshold (probabilities only fall
    along a path) and while it can still be a grid of at most `max_side` a side; one that reaches the token cap
    without EOS is dropped. Each prompt runs alone on its own copy of the prompt's keys and values (one row a
    step), cropped back on backtracking; the prefix stays intact, for scoring.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"DFS threshold {threshold} must be in (0, 1]")
    allowed = backend.vocab_ids(fmt.grid_vocabulary)
    vocab = allowed.cpu().numpy()
    head = backend.head_rows(allowed)
    floor = math.log(threshold)
    results = []
    with backend.decoding():
        for row in range(len(prefix.lengths)):
            if deadline is not None and time.monotonic() >= deadline:
                results.append([])
                continue
            results.append(_search_row(backend, prefix, row, fmt, vocab, head, floor, max_new_tokens, max_answers,
                                       deadline, max_side))
    return results


def _search_row(backend: Backend, prefix: Prefix, row: int, fmt: GridFormat, vocab: np.ndarray, head: Head,
                floor: float, max_new_tokens: int, max_answers: int, deadline: float | None, max_side: int
                ) -> list[Answer]:
    """The DFS of one prompt (see `dfs`)."""
    length = int(prefix.lengths[row])
    budget = min(max_new_tokens, backend.max_length - length)
    keys_values = [(k[row:row + 1, :, :length], v[row:row + 1, :, :length]) for k, v in prefix.keys_values]
    cache, fed = cache_rows(keys_values, legacy=prefix.legacy), 0  # the prompt plus `fed` tokens of the path
    hidden = prefix.last_hidden[row:row + 1]
    zero = np.zeros(1, np.int64)
    stack = [_Node([], 0.0, (zero, zero, zero), True)]
    answers: list[Answer] = []
    # past `max_answers`, only the greedy descent goes on (its node is always on top): its answer must be there
    while stack and (len(answers) < max_answers or stack[-1].greedy):
        node = stack.pop()
        if node.tokens:  # not the root: step the path's last token onto its parent's keys and values
            if deadline is not None and time.monotonic() >= deadline:
                break
            parent = len(node.tokens) - 1
            if fed > parent:
                cache = cache_rows([(k[:, :, :length + parent], v[:, :, :length + parent])
                                    for k, v in layer_keys_values(cache)], legacy=prefix.legacy)
            mask = torch.ones((1, length + parent + 1), dtype=torch.long, device=backend.device)
            positions = torch.full((1, 1), length + parent, dtype=torch.long, device=backend.device)
            token = torch.tensor([node.tokens[-1]], dtype=torch.long, device=backend.device)
            cache, hidden = backend.step(token, mask, positions, cache)
            fed = parent + 1
        log_probs = torch.log_softmax(backend.logits(hidden, head)[0], -1).double().cpu().numpy()
        totals = node.log_prob + log_probs
        width, line, lines, doomed = grid_step(fmt, max_side, *(np.repeat(s, len(vocab)) for s in node.state), vocab)
        best = int(np.argmax(log_probs))
        children = []
        for i in np.argsort(log_probs, kind="stable"):  # least likely first: the most likely is popped first
            i = int(i)
            greedy = node.greedy and i == best
            if doomed[i] or not (greedy or totals[i] >= floor):
                continue
            tokens = [*node.tokens, int(vocab[i])]
            if vocab[i] == fmt.eos_id:
                answers.append(Answer(np.array(tokens, np.int64), float(totals[i]), greedy))
            elif len(tokens) < budget:
                children.append(_Node(tokens, float(totals[i]), (width[i:i + 1], line[i:i + 1], lines[i:i + 1]),
                                      greedy))
        stack += children
    answers.sort(key=lambda a: not a.greedy)  # stable: the others stay in the order found
    return answers[:max_answers]

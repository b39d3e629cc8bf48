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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from kit.backend.cache import Prefix, cache_rows, layer_keys_values, until_first
from kit.format import GridFormat, grid_step
from kit.grids import MAX_SIDE

if TYPE_CHECKING:
    from kit.backend import Backend
    from kit.backend.likelihood import Ids

COMPACT_FROM = 64  # dead cache slots a DFS row may hold (and at least as many as its live ones) before compaction

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


@dataclass
class _Search:
    """One prompt's DFS: the nodes left to expand, the answers found, and the cache slot of each token of the path
    it has fed so far (its prompt sits in slots 0..length-1)."""
    row: int
    length: int
    budget: int
    stack: list[_Node]
    answers: list[Answer]
    path: list[int]

    def next_node(self, max_answers: int) -> _Node | None:
        """The node to step next, None when the search is over (past `max_answers` only the greedy descent goes
        on: its node is always on top, and its answer must be there)."""
        if self.stack and (len(self.answers) < max_answers or self.stack[-1].greedy):
            return self.stack.pop()
        return None


def dfs(backend: Backend, prefix: Prefix, fmt: GridFormat, threshold: float, max_new_tokens: int,
        max_answers: int, deadline: float | None = None, max_side: int = MAX_SIDE) -> list[list[Answer]]:
    """Per prefilled prompt, every answer over the grid vocabulary whose probability is at least `threshold`,
    plus the greedy answer whatever its probability (when it ends within `max_new_tokens`), as at most
    `max_answers` answers, greedy first, the others in the order found (most likely branch first).

    A path is extended only while its probability stays at or above the threshold (probabilities only fall
    along a path) and while it can still be a grid of at most `max_side` a side; one that reaches the token cap
    without EOS is dropped. The prompts search side by side, one node each per batched step on a copy of the
    prompts' keys and values (the prefix stays intact, for scoring): a node's token goes into a new cache slot,
    backtracking masks out the slots of the abandoned path, and the cache is compacted once such dead slots
    outnumber the live ones. A prompt whose search is over leaves the batch; at the deadline all stop with what
    they have.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"DFS threshold {threshold} must be in (0, 1]")
    allowed = backend.vocab_ids(fmt.grid_vocabulary)
    vocab = allowed.cpu().numpy()
    head = backend.head_rows(allowed)
    floor = math.log(threshold)
    zero = np.zeros(1, np.int64)
    if deadline is not None and time.monotonic() >= deadline:
        return [[] for _ in prefix.lengths]
    searches = [_Search(row, int(length), min(max_new_tokens, backend.max_length - int(length)),
                        [], [], []) for row, length in enumerate(prefix.lengths.tolist())]
    active = list(searches)  # the batch's rows, in order
    nodes = [_Node([], 0.0, (zero, zero, zero), True) for _ in active]  # each row's node to expand
    cache, mask, hidden = cache_rows(prefix.keys_values, legacy=prefix.legacy), prefix.mask.clone(), prefix.last_hidden
    with backend.decoding():
        while active:
            log_probs = torch.log_softmax(backend.logits(hidden, head), -1).double().cpu().numpy()
            for search, node, row_log_probs in zip(active, nodes, log_probs):
                _expand(search, node, row_log_probs, fmt, vocab, floor, max_side)
            if deadline is not None and time.monotonic() >= deadline:
                break
            nodes = [search.next_node(max_answers) for search in active]
            keep = [i for i, node in enumerate(nodes) if node is not None]
            if len(keep) < len(active):  # finished searches leave the batch: the others' steps get cheaper
                if not keep:
                    break
                index = torch.tensor(keep, device=backend.device)
                cache = cache_rows(layer_keys_values(cache), index, prefix.legacy)
                mask, active, nodes = mask[index], [active[i] for i in keep], [nodes[i] for i in keep]
            for b, (search, node) in enumerate(zip(active, nodes)):  # back up to the node's parent
                parent = len(node.tokens) - 1
                mask[b, search.path[parent:]] = 0
                del search.path[parent:]
            if _dead_slots(mask) > max(COMPACT_FROM, int(mask.sum(1).max())):
                cache, mask = _compacted(cache, mask, active, prefix.legacy)
            slot = mask.shape[1]
            mask = F.pad(mask, (0, 1), value=1)
            tokens = torch.tensor([node.tokens[-1] for node in nodes], dtype=torch.long, device=backend.device)
            positions = torch.tensor([[search.length + len(node.tokens) - 1] for search, node in zip(active, nodes)],
                                     dtype=torch.long, device=backend.device)
            cache, hidden = backend.step(tokens, mask, positions, cache)
            for search in active:
                search.path.append(slot)
    results = []
    for search in searches:
        search.answers.sort(key=lambda a: not a.greedy)  # stable: the others stay in the order found
        results.append(search.answers[:max_answers])
    return results


def _expand(search: _Search, node: _Node, log_probs: np.ndarray, fmt: GridFormat, vocab: np.ndarray,
            floor: float, max_side: int) -> None:
    """The node's children above the floor that can still be a grid, pushed least likely first (so the most
    likely is popped first); those that end in EOS are answers."""
    totals = node.log_prob + log_probs
    width, line, lines, doomed = grid_step(fmt, max_side, *(np.repeat(s, len(vocab)) for s in node.state), vocab)
    best = int(np.argmax(log_probs))
    children = []
    for i in np.argsort(log_probs, kind="stable"):
        i = int(i)
        greedy = node.greedy and i == best
        if doomed[i] or not (greedy or totals[i] >= floor):
            continue
        tokens = [*node.tokens, int(vocab[i])]
        if vocab[i] == fmt.eos_id:
            search.answers.append(Answer(np.array(tokens, np.int64), float(totals[i]), greedy))
        elif len(tokens) < search.budget:
            children.append(_Node(tokens, float(totals[i]), (width[i:i + 1], line[i:i + 1], lines[i:i + 1]), greedy))
    search.stack += children


def _dead_slots(mask: torch.Tensor) -> int:
    """Cache slots the widest-waste row no longer attends to: padding and abandoned paths."""
    return int((mask.shape[1] - mask.sum(1)).max())


def _compacted(cache: Any, mask: torch.Tensor, active: list[_Search], legacy: bool) -> tuple[Any, torch.Tensor]:
    """The cache with each row's live slots (its prompt, then its path) moved to the front, in order; the paths'
    slots renumbered to match."""
    live = [list(range(search.length)) + search.path for search in active]
    width = max(map(len, live))
    index = torch.zeros((len(live), width), dtype=torch.long, device=mask.device)
    compact = torch.zeros((len(live), width), dtype=mask.dtype, device=mask.device)
    for b, slots in enumerate(live):
        index[b, :len(slots)] = torch.tensor(slots, dtype=torch.long)
        compact[b, :len(slots)] = 1
    gathered = []
    for keys, values in layer_keys_values(cache):
        at = index[:, None, :, None].expand(keys.shape[0], keys.shape[1], width, keys.shape[3])
        gathered.append((keys.gather(2, at), values.gather(2, at)))
    for search in active:
        search.path = list(range(search.length, search.length + len(search.path)))
    return cache_rows(gathered, legacy=legacy), compact

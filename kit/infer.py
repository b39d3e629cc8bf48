"""Augmented inference: decode a test input under several invertible views of its task in one batch, map each
answer back, then score every distinct candidate under every view (product of experts) for vote.py."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kit.augment import NUM_SYMMETRIES, Augmentation, random_augmentation
from kit.config import InferSettings
from kit.decode import dfs, greedy
from kit.format import FormatError, GridFormat, GridWatch, answer_budget, demos_that_fit
from kit.grids import Grid
from kit.shapes import plausible_side
from kit.tasks import Task
from kit.vote import Candidate, tally

if TYPE_CHECKING:  # the backend imports torch and transformers; only its types are needed here
    from kit.backend import Backend, Prefix


def inference_views(rng: np.random.Generator, count: int, num_demos: int, keep_background: bool = True
                    ) -> list[Augmentation]:
    """The identity first, then random views that cycle through the other symmetries."""
    return [Augmentation(), *cycled_views(rng, 1, count, num_demos, keep_background)]


def cycled_views(rng: np.random.Generator, start: int, stop: int, num_demos: int, keep_background: bool = True
                 ) -> list[Augmentation]:
    """Random views number `start` to `stop` - 1, view i under symmetry i mod 8, with random colours and
    demonstration orders (the decoding views after the identity, then fresh score views after those)."""
    return [random_augmentation(rng, num_demos, keep_background, symmetry=i % NUM_SYMMETRIES)
            for i in range(start, stop)]


def view_prompt(fmt: GridFormat, task: Task, test_input: Grid, view: Augmentation, answer_tokens: int,
                max_length: int) -> np.ndarray | None:
    """The prompt of a test input under a view, demonstrations dropped to leave room for the answer."""
    demos = demos_that_fit(view.pairs(task.train), view.grid(test_input), answer_tokens, max_length,
                      bos=fmt.bos_id is not None)
    return None if demos is None else fmt.encode_prompt(demos, view.grid(test_input))


def view_prompts(fmt: GridFormat, task: Task, test_input: Grid, views: list[Augmentation], answer_tokens: int,
                 max_length: int) -> tuple[list[Augmentation], list[np.ndarray]]:
    """The views whose prompt leaves room for the answer, and those prompts (the others are dropped)."""
    kept, prompts = [], []
    for view in views:
        if (prompt := view_prompt(fmt, task, test_input, view, answer_tokens, max_length)) is not None:
            kept.append(view)
            prompts.append(prompt)
    return kept, prompts


@dataclass
class Decoded:
    """One test input's candidates as decoding left them (no view scores yet), with what scoring them needs: the
    views that decoded them, their prompts and, where they were kept, their prefilled caches."""
    candidates: list[Candidate]
    views: list[Augmentation]
    prompts: list[np.ndarray]
    answer_tokens: int
    prefilled: list[tuple[list[int], Prefix]] | None


def predict(backend: Backend, fmt: GridFormat, task: Task, test_input: Grid, settings: InferSettings,
            rng: np.random.Generator, deadline: float | None = None) -> list[Candidate]:
    """Candidates for one test input, each with its votes and its log-likelihood under every view (the decoding
    views, then `score_views` - `augs` fresh ones). At `deadline` (a time.monotonic() instant) decoding and scoring
    stop where they are."""
    decoded = decode_candidates(backend, fmt, task, test_input, settings, rng, deadline)
    fresh, fresh_prompts = fresh_views(fmt, task, test_input, decoded, settings, rng, backend.max_length)
    score_under_views(backend, fmt, decoded.candidates, decoded.views + fresh, decoded.prompts + fresh_prompts,
                      settings, deadline, decoded.prefilled)
    return decoded.candidates


def decode_candidates(backend: Backend, fmt: GridFormat, task: Task, test_input: Grid, settings: InferSettings,
                      rng: np.random.Generator, deadline: float | None = None) -> Decoded:
    """Decode the test input under `augs` views (the search `settings` names), every answer mapped back and
    tallied into candidates."""
    side = plausible_side(task, test_input)
    answer_tokens = answer_budget(side)
    views, prompts = view_prompts(fmt, task, test_input,
                                  inference_views(rng, settings.augs, len(task.train), settings.keep_background),
                                  answer_tokens, backend.max_length)
    # Decoding's prefill serves scoring too; all views' at once where the memory plan's decoding batch holds them.
    keep = len(prompts) <= settings.batch_size
    grids, prefilled = [], []
    for n, group in enumerate(batches([len(p) + answer_tokens for p in prompts], settings)):
        if n and past(deadline):
            break
        prefix = backend.prefill([prompts[i] for i in group])
        for view, outputs in zip([views[i] for i in group], search(backend, fmt, prefix, len(group), side,
                                                                  answer_tokens, settings, deadline)):
            grids += inverted_grids(fmt, [view] * len(outputs), outputs)
        if keep:
            prefilled.append((group, prefix))
    return Decoded(tally(grids), views, prompts, answer_tokens, prefilled if keep else None)


def fresh_views(fmt: GridFormat, task: Task, test_input: Grid, decoded: Decoded, settings: InferSettings,
                rng: np.random.Generator, max_length: int) -> tuple[list[Augmentation], list[np.ndarray]]:
    """Views number `augs` to `score_views` - 1 (new symmetries, colours and orders) and their prompts: experts
    that did not decode the candidates judge them too."""
    fresh = cycled_views(rng, len(decoded.views), settings.score_views, len(task.train), settings.keep_background)
    return view_prompts(fmt, task, test_input, fresh, decoded.answer_tokens, max_length)


def search(backend: Backend, fmt: GridFormat, prefix: Prefix, rows: int, side: int, answer_tokens: int,
           settings: InferSettings, deadline: float | None) -> list[list[np.ndarray]]:
    """Each prefilled view's decoded answers (token ids), by the search `settings` names (kit/decode.py): the
    greedy one, or with DFS every one at least `dfs_threshold` likely (at most `dfs_max`, greedy first)."""
    if settings.search == "greedy":
        outputs = greedy(backend, prefix, fmt.grid_vocabulary, fmt.eos_id, answer_tokens, deadline,
                         GridWatch(fmt, rows, side).step)
        return [[ids] for ids in outputs]
    if settings.search == "dfs":
        found = dfs(backend, prefix, fmt, settings.dfs_threshold, answer_tokens, settings.dfs_max, deadline, side)
        return [[answer.tokens for answer in answers] for answers in found]
    raise ValueError(f"unknown search {settings.search!r}; use 'greedy' or 'dfs'")


def inverted_grids(fmt: GridFormat, views: list[Augmentation], outputs: list[np.ndarray]) -> list[Grid]:
    """Each decoded answer that parses as a grid, mapped back through the view it was decoded under; the others
    are dropped."""
    grids = []
    for view, ids in zip(views, outputs):
        try:
            grids.append(view.invert_grid(fmt.parse_grid(ids)))
        except FormatError:
            continue
    return grids


def batches(lengths: list[int], settings: InferSettings) -> list[list[int]]:
    """Consecutive indices in batches of at most `batch_size` sequences and `max_batch_tokens` padded tokens
    (one sequence at least): bounds the memory of a forward pass and how far it can run past a deadline."""
    chunks: list[list[int]] = []
    longest = 0
    for i, length in enumerate(lengths):
        if chunks and len(chunks[-1]) < settings.batch_size and \
                (len(chunks[-1]) + 1) * max(longest, length) <= settings.max_batch_tokens:
            chunks[-1].append(i)
            longest = max(longest, length)
        else:
            chunks.append([i])
            longest = length
    return chunks


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def score_under_views(backend: Backend, fmt: GridFormat, candidates: list[Candidate], views: list[Augmentation],
                      prompts: list[np.ndarray], settings: InferSettings, deadline: float | None = None,
                      prefilled: list[tuple[list[int], Prefix]] | None = None) -> None:
    """Fill each candidate's view_scores: log p(candidate seen through the view | the view's prompt). The prompts
    run once, batched (`Backend.prefill`, or decoding's `prefilled` groups of views, reused), then all
    (candidate, view) answers in batches after them: views x prompt + candidates x views x answer tokens instead
    of candidates x views x (prompt + answer), in a few passes. `prefilled` may cover some views only (the
    decoding views, not the fresh ones). Pairs not scored by `deadline` stay -inf, like over-long ones: a
    candidate is then judged on the views that did score it (`Candidate.score`)."""
    scores = np.full((len(candidates), len(views)), float("-inf"))
    answers = [[fmt.encode_answer(view.grid(c.grid)) for c in candidates] for view in views]
    covered = {v for group, _ in prefilled or [] for v in group}
    rest = [v for v in range(len(views)) if v not in covered]
    longest = max((len(a) for seen in answers for a in seen), default=0)
    groups = list(prefilled or []) + [([rest[i] for i in chunk], None)
                                      for chunk in batches([len(prompts[v]) + longest for v in rest], settings)]
    for group, prefix in groups if candidates else []:
        # A candidate too long to be seen through a view scores -inf there (no evidence for it) instead of failing.
        pairs = [(c, v) for v in group for c in range(len(candidates))
                 if len(prompts[v]) + len(answers[v][c]) <= backend.max_length]
        if not pairs or past(deadline):
            continue
        if prefix is None:
            prefix = backend.prefill([prompts[v] for v in group])
        for n, chunk in enumerate(batches([len(answers[v][c]) for c, v in pairs], settings)):
            if n and past(deadline):
                break
            chosen = [pairs[i] for i in chunk]
            rows, seen = zip(*[(group.index(v), answers[v][c]) for c, v in chosen])
            scores[tuple(zip(*chosen))] = backend.score(prefix, rows, seen, fmt.grid_vocabulary)
    for candidate, row in zip(candidates, scores):
        candidate.view_scores.extend(row.tolist())

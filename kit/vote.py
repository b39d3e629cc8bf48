"""Pick two attempts from the candidates that augmented decoding produced.

A candidate is a grid (already mapped back to the task's frame) with the augmentations that produced it
(its votes) and its log-likelihood under every augmented view (product of experts: the ARChitects' selection).
Pure numpy; the scores are computed by infer.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kit.grids import Grid, to_json


@dataclass
class Candidate:
    grid: Grid
    votes: int = 0  # augmented decodes that produced this grid
    view_scores: list[float] = field(default_factory=list)  # log p(grid | view), one per augmented view

    @property
    def score(self) -> float:
        """Mean log-likelihood across the views that scored it: the product of the views' experts, normalised per
        view. A view that could not (the candidate too long for it, or the deadline) is no evidence either way:
        it is left out rather than counted as -inf, which would rank a right answer last for one missing view."""
        scored = [s for s in self.view_scores if s != float("-inf")]
        return float(np.mean(scored)) if scored else float("-inf")

    def to_record(self) -> dict:
        return {"grid": to_json(self.grid), "votes": self.votes, "score": self.score,
                "view_scores": [round(s, 4) for s in self.view_scores]}


def tally(grids: list[Grid]) -> list[Candidate]:
    """Identical grids become one candidate with that many votes (first-seen order)."""
    by_key: dict[bytes, Candidate] = {}
    for grid in grids:
        key = bytes(grid.shape) + grid.tobytes()
        by_key.setdefault(key, Candidate(grid)).votes += 1
    return list(by_key.values())


RANK_BY = ("score", "votes", "combined")


def rank(candidates: list[Candidate], method: str = "score") -> list[Candidate]:
    """Best first. "score": product-of-experts likelihood, votes break ties; "votes": votes, then score;
    "combined": the likelihood plus the log of the votes, i.e. the views' experts times a prior proportional to
    how often decoding found the grid (a grid found by every view beats a slightly likelier one found once)."""
    if method == "score":
        key = lambda c: (c.score, c.votes)  # noqa: E731
    elif method == "votes":
        key = lambda c: (c.votes, c.score)  # noqa: E731
    elif method == "combined":
        key = lambda c: (c.score + np.log(max(c.votes, 1)), c.votes)  # noqa: E731
    else:
        raise ValueError(f"unknown ranking method {method!r}; use one of {', '.join(RANK_BY)}")
    return sorted(candidates, key=key, reverse=True)


def two_attempts(ranked: list[Candidate], fallback: Grid) -> tuple[Grid, Grid]:
    """Always two valid grids: the best two candidates, padded with the fallback."""
    grids = [c.grid for c in ranked[:2]]
    while len(grids) < 2:
        grids.append(fallback)
    return grids[0], grids[1]

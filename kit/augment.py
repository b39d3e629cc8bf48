"""Invertible augmentations of ARC tasks, and leave-one-out training examples built with them.

An augmentation is one symmetry of the square (of the 8), a colour permutation and an order of the
demonstrations. Every piece has an exact inverse, so an answer produced under an augmentation can be
mapped back to the original task. Pure numpy: no torch on the data path.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from kit.grids import NUM_COLOURS, Grid
from kit.tasks import Pair, Task

NUM_SYMMETRIES = 8
IDENTITY_COLOURS = np.arange(NUM_COLOURS, dtype=np.uint8)


def apply_symmetry(grid: Grid, symmetry: int) -> Grid:
    """Symmetry k of the square: rotate by (k % 4) quarter turns, then transpose when k >= 4."""
    out = np.rot90(grid, symmetry % 4)
    return np.ascontiguousarray(out.T if symmetry >= 4 else out)


def invert_symmetry(grid: Grid, symmetry: int) -> Grid:
    """Undo apply_symmetry(., symmetry)."""
    out = grid.T if symmetry >= 4 else grid
    return np.ascontiguousarray(np.rot90(out, -(symmetry % 4)))


def _symmetry_tables() -> tuple[np.ndarray, np.ndarray]:
    """Composition and inverse tables of the 8 symmetries, found by acting on a probe grid."""
    probe = np.arange(6).reshape(2, 3)
    images = [apply_symmetry(probe, k) for k in range(NUM_SYMMETRIES)]

    def index_of(grid: np.ndarray) -> int:
        return next(k for k, img in enumerate(images) if img.shape == grid.shape and (img == grid).all())

    compose = np.array([[index_of(apply_symmetry(images[a], b)) for b in range(NUM_SYMMETRIES)]
                        for a in range(NUM_SYMMETRIES)])
    inverse = np.array([index_of(invert_symmetry(probe, k)) for k in range(NUM_SYMMETRIES)])
    return compose, inverse


SYMMETRY_THEN, SYMMETRY_INVERSE = _symmetry_tables()


@dataclass(frozen=True)
class Augmentation:
    """Symmetry, then colour map (colours[c] is the new colour of c), then demonstration order.

    `order[i]` is the index of the original demonstration shown at position i.
    """

    symmetry: int = 0
    colours: np.ndarray = field(default_factory=lambda: IDENTITY_COLOURS)
    order: tuple[int, ...] | None = None  # None: keep the order, whatever the number of demonstrations

    def grid(self, grid: Grid) -> Grid:
        return self.colours[apply_symmetry(grid, self.symmetry)]

    def invert_grid(self, grid: Grid) -> Grid:
        return invert_symmetry(np.argsort(self.colours).astype(np.uint8)[grid], self.symmetry)

    def pairs(self, pairs: list[Pair]) -> list[Pair]:
        ordered = pairs if self.order is None else [pairs[i] for i in self.order]
        return [Pair(self.grid(p.input), self.grid(p.output)) for p in ordered]

    def inverse(self) -> Augmentation:
        order = None if self.order is None else tuple(int(i) for i in np.argsort(self.order))
        return Augmentation(int(SYMMETRY_INVERSE[self.symmetry]), np.argsort(self.colours).astype(np.uint8), order)

    def then(self, other: Augmentation) -> Augmentation:
        """The augmentation that applies self, then other."""
        if self.order is None or other.order is None:
            order = self.order if other.order is None else other.order
        else:
            order = tuple(self.order[i] for i in other.order)
        # other's colour map acts on the grid after self's symmetry, and colour maps commute with symmetries.
        return Augmentation(int(SYMMETRY_THEN[self.symmetry, other.symmetry]), other.colours[self.colours], order)

    def describe(self) -> str:
        return f"sym{self.symmetry}/col{''.join(map(str, self.colours))}" + (
            "" if self.order is None else f"/ord{','.join(map(str, self.order))}")


def random_colours(rng: np.random.Generator, keep_background: bool = True) -> np.ndarray:
    """A random permutation of the 10 colours; colour 0 (background) stays 0 unless told otherwise."""
    if keep_background:
        return np.concatenate([[0], 1 + rng.permutation(NUM_COLOURS - 1)]).astype(np.uint8)
    return rng.permutation(NUM_COLOURS).astype(np.uint8)


def random_augmentation(rng: np.random.Generator, num_demos: int, keep_background: bool = True,
                        symmetry: int | None = None) -> Augmentation:
    """Random colours and demonstration order, and a random symmetry unless one is given."""
    if symmetry is None:
        symmetry = int(rng.integers(NUM_SYMMETRIES))
    colours = random_colours(rng, keep_background)
    return Augmentation(symmetry, colours, tuple(int(i) for i in rng.permutation(num_demos)))


def task_seed(seed: int, task_id: str) -> int:
    """One integer from the run seed and the task id (a task's fresh LoRA): runs are reproducible."""
    return zlib.crc32(f"{seed}:{task_id}".encode())


def task_rng(seed: int, task_id: str, purpose: str = "") -> np.random.Generator:
    """A generator that depends only on the run seed, the task id and what it is for: runs are reproducible."""
    return np.random.default_rng([seed, zlib.crc32(task_id.encode()), zlib.crc32(purpose.encode())])


@dataclass(frozen=True)
class LooExample:
    """One training sequence: demonstrations as context, then a query pair whose output is learned."""

    demos: list[Pair]
    query: Pair
    augmentation: Augmentation


def leave_one_out(task: Task, rng: np.random.Generator, count: int,
                  keep_background: bool = True) -> list[LooExample]:
    """`count` leave-one-out examples: each demonstration in turn is the query, the others the context,
    all under a fresh random augmentation. A task with one demonstration yields it with no context."""
    examples = []
    n = len(task.train)
    for i in range(count):
        held_out = i % n
        others = [p for j, p in enumerate(task.train) if j != held_out]
        aug = random_augmentation(rng, len(others), keep_background)
        query = task.train[held_out]
        examples.append(LooExample(aug.pairs(others), Pair(aug.grid(query.input), aug.grid(query.output)), aug))
    return examples

"""ARC grids as small numpy arrays, and the one validator every loader goes through."""
from __future__ import annotations

from typing import Any

import numpy as np

Grid = np.ndarray  # 2-D, dtype uint8, values 0..9, each side 1..30

MAX_SIDE = 30
NUM_COLOURS = 10


class GridError(ValueError):
    """A grid (or a task, or a file holding them) is not valid ARC data; the message says where and why."""


def to_grid(value: Any, where: str) -> Grid:
    """Validate a JSON-like grid (list of rows of ints) and return it as a uint8 array.

    `where` names the file, task and field, so the error points at the bad data.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise GridError(f"{where}: expected a non-empty list of rows, got {_describe(value)}")
    if len(value) > MAX_SIDE:
        raise GridError(f"{where}: {len(value)} rows, at most {MAX_SIDE} allowed")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise GridError(f"{where}: row {r} is {_describe(row)}, expected a non-empty list of ints")
        if width is None:
            width = len(row)
            if width > MAX_SIDE:
                raise GridError(f"{where}: {width} columns, at most {MAX_SIDE} allowed")
        elif len(row) != width:
            raise GridError(f"{where}: row {r} has {len(row)} cells, row 0 has {width} (grid is not rectangular)")
        for c, cell in enumerate(row):
            if type(cell) is not int or not 0 <= cell < NUM_COLOURS:  # bool is not a colour
                raise GridError(f"{where}: cell [{r}][{c}] is {cell!r}, expected an int 0..9")
    return np.array(value, dtype=np.uint8)


def to_json(grid: Grid) -> list[list[int]]:
    """The Kaggle JSON form of a grid."""
    return np.asarray(grid).tolist()


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"

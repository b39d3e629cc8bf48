"""What an answer can look like, from the demonstrations alone (never the test outputs): the longest plausible
side, which caps decoding and sizes the memory plan, and the shape the demonstrations imply, which the planner
values. Shared by the planner, the memory plan and inference; pure numpy."""
from __future__ import annotations

import math

from kit.grids import MAX_SIDE, Grid
from kit.tasks import Task

PLAUSIBLE_MARGIN = 1.25  # ARC-1/2 eval outputs up to a quarter larger than every demonstration's side exist


def plausible_side(task: Task, test_input: Grid) -> int:
    """The longest side a test output could plausibly have: the larger of the demonstrations' outputs and the
    test input scaled as the demonstrations scale their inputs, plus a margin. Caps decoding length."""
    scale = max(max(p.output.shape) / max(p.input.shape) for p in task.train)
    demo_side = max(max(p.output.shape) for p in task.train)
    side = max(demo_side, math.ceil(max(test_input.shape) * scale))
    return min(MAX_SIDE, math.ceil(side * PLAUSIBLE_MARGIN))


def expected_output_shape(task: Task, test_input: Grid) -> tuple[int, int] | None:
    """The output shape the demonstrations imply for this input (same as the input, a constant, or the same
    scale factor), or None when they follow no such rule."""
    ins = [p.input.shape for p in task.train]
    outs = [p.output.shape for p in task.train]
    if all(i == o for i, o in zip(ins, outs)):
        return test_input.shape
    if len(set(outs)) == 1:
        return outs[0]
    ratios = {(o[0] / i[0], o[1] / i[1]) for i, o in zip(ins, outs)}
    if len(ratios) == 1:
        (rh, rw), = ratios
        return max(1, round(test_input.shape[0] * rh)), max(1, round(test_input.shape[1] * rw))
    return None

"""The budget: what each task gets (TTT steps, inference views) so that the run ends in time and the expected
number of solved tasks is as high as the time allows. Torch-free: the planner runs before any model loads.

Cost of a task = its tokens (from grid shapes alone) through a throughput profile of this machine and model.
Value of a task = the chance that greedy decoding reproduces its answer exactly, modelled as
exp(-answer_tokens * L(steps)) with a per-token loss L that falls from the untrained model's level towards a
floor as TTT proceeds, times a saturating gain from more inference views. Small answers on cheap tasks are worth
most per second; a large answer needs many steps before it is worth anything (the value is S-shaped in steps,
so the planner compares whole levels, not single increments). The model is crude on purpose: its job is to
rank tasks and levels; real timings correct the costs as the run goes.

Over 300 lines on purpose: the profile (costs), the difficulty model (values) and the planner that trades one
for the other are one argument, read together; each part is a small class of its own.
"""
from __future__ import annotations

import heapq
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.format import answer_budget, demos_that_fit, grid_tokens, sequence_tokens
from kit.record import TaskRecord
from kit.shapes import expected_output_shape, plausible_side
from kit.tasks import Task

_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([hms])")


def parse_duration(text: str) -> float:
    """Seconds in '11h30m', '10m', '90s', '1h 5m 3s' or a bare number of seconds."""
    cleaned = text.strip().lower()
    try:
        seconds = float(cleaned)
    except ValueError:
        parts = _DURATION.findall(cleaned)
        if not parts or _DURATION.sub("", cleaned).strip():
            raise ValueError(f"not a duration: {text!r} (use e.g. 11h30m, 10m, 90s)") from None
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# DFS (kit/decode.py) decodes all views in one batch and backtracks. Fitted to bench/selection.py on 10 held-out
# tasks (docs/selection.jsonl, 8 views, 2026-12-04, 2-core fp32 CPU, the profile --calibrate measured there):
# p = 0.1 found 1.52x greedy's candidates (8.6 against 5.65 per test input) and cost 10.4 s a task more, p = 0.2
# 1.18x and 3.6 s; twice greedy's decoding steps and 1.5x its candidates price that at 13.6 s (kept above both).
DFS_EXPANSION = 2.0  # batched DFS decoding steps over greedy's
DFS_CANDIDATES = 1.5  # DFS candidates over greedy's

# --- throughput ---------------------------------------------------------------------------------------------

@dataclass
class Profile:
    """Throughput of one machine and model (measured by `--calibrate`, else these defaults, which are the
    embedded SmolLM2-135M on a 2-core AVX512-BF16 CPU). Every cost the planner uses comes from here."""

    device: str = "cpu"
    model: str = ""
    train_tokens_per_s: float = 380.0  # tokens of a TTT batch (sum over rows) per second, forward + backward
    train_step_s: float = 0.05  # fixed cost of one optimizer step
    prefill_tokens_per_s: float = 1800.0  # no-grad forward tokens per second (prompts, likelihood scoring)
    decode_step_s: float = 0.035  # one decoding step of a batch, whatever its rows
    decode_row_s: float = 0.006  # plus this per row and step
    task_overhead_s: float = 0.3  # sequences, LoRA reset, voting, writing the results
    model_load_s: float = 15.0  # imports and model load of a worker, before its first task
    calibrated: bool = False

    def train_seconds(self, steps: int, tokens_per_step: float) -> float:
        return steps * (self.train_step_s + tokens_per_step / self.train_tokens_per_s)

    def infer_seconds(self, views: int, prompt_tokens: int, decode_tokens: int, tests: int,
                      score_views: int = 0, search: str = "greedy") -> float:
        """Prefill `views` prompts and decode them in one batch (greedy: up to `decode_tokens` steps; DFS:
        DFS_EXPANSION x as many, backtracking), then score the candidates (about views/2 greedy, DFS_CANDIDATES x
        that with DFS) under every one of max(views, `score_views`) views (product of experts: their answers after
        the prefilled prompts; fresh score views prefill their prompts too), for each test input."""
        judges = max(views, score_views)
        prefill = judges * prompt_tokens / self.prefill_tokens_per_s
        decode = decode_tokens * (self.decode_step_s + views * self.decode_row_s)
        candidates = max(1.0, views / 2)
        if search == "dfs":
            decode *= DFS_EXPANSION
            candidates *= DFS_CANDIDATES
        scoring = candidates * judges * decode_tokens / self.prefill_tokens_per_s
        return tests * (prefill + decode + scoring)

    def save(self, path: Path) -> None:
        from kit.atomic import write_json_atomic

        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Profile:
        from kit.tasks import read_json

        raw = read_json(path)
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not set(raw) <= known:
            unknown = sorted(set(raw) - known) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path}: not a throughput profile (unexpected {unknown})")
        profile = cls(**raw)
        rates = (profile.train_tokens_per_s, profile.prefill_tokens_per_s)
        if min(rates) <= 0 or min(profile.train_step_s, profile.decode_step_s, profile.decode_row_s) < 0:
            raise ValueError(f"{path}: throughputs must be positive and times non-negative")
        return profile


# --- what one task costs and is worth -----------------------------------------------------------------------

@dataclass(frozen=True)
class Difficulty:
    """The parameters of the value model (see the module docstring). Loss falls on two timescales: most of it
    within tens of steps (measured on the default model: ~1/3 left after 10 steps), a small rest only over
    hundreds, which is what long TTT buys a large answer (arc24: two-attempt accuracy 14% -> 24.5% from far
    longer TTT). Views saturate more slowly than one view's worth suggests (arc24: 8 predictions too few, ~32
    better): the scale-up's reasons to spend a budget's spare time (docs/results.md, "Scale-up")."""

    untrained_loss: float = 1.5  # per-token loss of the untrained default model on ARC answers (measured 1.1-2.5)
    floor_loss: float = 0.02  # what long TTT reaches on a learnable task, as seen on its held-out answer
    steps_scale: float = 15.0  # steps for the fast part of the loss to fall by a factor e
    slow_share: float = 0.03  # the part of the loss that only long TTT removes
    slow_steps_scale: float = 400.0  # and its steps to fall by a factor e
    view_gain: float = 0.25  # chance that one more view finds or confirms the answer (saturates with views)
    unknown_shape: float = 0.5  # the demonstrations show no rule for the output's shape: a harder task

    def loss_after(self, steps: float) -> float:
        left = ((1 - self.slow_share) * math.exp(-steps / self.steps_scale)
                + self.slow_share * math.exp(-steps / self.slow_steps_scale))
        return self.floor_loss + (self.untrained_loss - self.floor_loss) * left

    def solve_chance(self, answer_tokens: float, shape_known: bool, steps: int, views: int) -> float:
        if views <= 0:
            return 0.0
        exact = math.exp(-answer_tokens * self.loss_after(steps))
        selected = 1.0 - (1.0 - self.view_gain) ** views
        return exact * selected * (1.0 if shape_known else self.unknown_shape)


@dataclass(frozen=True)
class TaskEstimate:
    """Shape-derived sizes of one task (no tokenizer, no model, no solutions)."""

    task_id: str
    tests: int
    step_tokens: float  # one TTT batch: batch_size x the mean leave-one-out sequence (demos dropped to fit)
    prompt_tokens: int  # the longest test prompt
    decode_tokens: int  # decoding cap: the largest plausible answer (what an unsure model may run to)
    answer_tokens: float  # the expected answer, summed over test inputs (what must come out exactly)
    shape_known: bool

    @classmethod
    def of(cls, task: Task, batch_size: int, max_length: int) -> TaskEstimate:
        loo = []
        for i, query in enumerate(task.train):
            others = task.train[:i] + task.train[i + 1:]
            demos = demos_that_fit(others, query.input, grid_tokens(query.output.shape) + 1, max_length) or []
            loo.append(min(max_length, sequence_tokens(demos, query.input, query.output.shape)))
        answers, known = 0.0, True
        for grid in task.test_inputs:
            shape = expected_output_shape(task, grid)
            known &= shape is not None
            answers += grid_tokens(shape) + 1 if shape else np.mean([grid_tokens(p.output.shape) + 1
                                                                     for p in task.train])
        decode = max(answer_budget(plausible_side(task, g)) for g in task.test_inputs)
        prompt = max(sequence_tokens(task.train, g) for g in task.test_inputs)
        return cls(task.id, len(task.test_inputs), batch_size * float(np.mean(loo)),
                   min(prompt, max(1, max_length - decode)), decode, answers, known)


@dataclass(frozen=True)
class Level:
    steps: int
    views: int  # 0: no model at all (the fallback answer)


def levels(max_steps: int, max_views: int, base_steps: int | None = None, base_views: int | None = None
           ) -> list[Level]:
    """The choices per task: the fallback, then inference alone, then TTT at a few lengths, each with a few
    view counts, up to the caps; the base level (--steps, --augs) always among them. Coarse on purpose: the
    planner's model is not finer than this."""
    steps = sorted({0, max_steps, base_steps or max_steps}
                   | {s for s in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if s < max_steps})
    views = sorted({max_views, base_views or max_views} | {v for v in (1, 2, 4, 8, 16, 32, 64) if v < max_views})
    return [Level(0, 0)] + [Level(s, v) for s in steps for v in views]


@dataclass(frozen=True)
class Assignment:
    task_id: str
    steps: int
    views: int
    seconds: float  # expected, with the run's correction factors applied
    expected: float  # expected solved test outputs
    base: Level | None = None  # the level the task had before the scale-up (None: not scaled)

    @property
    def runs_model(self) -> bool:
        return self.views > 0


@dataclass
class Corrections:
    """Measured over predicted time so far (1 = the profile was right), for training and for inference."""

    train: float = 1.0
    infer: float = 1.0
    weight: float = 0.3  # of each new observation in the running mean

    def update(self, predicted_train: float, actual_train: float, predicted_infer: float,
               actual_infer: float) -> None:
        for name, predicted, actual in (("train", predicted_train, actual_train),
                                        ("infer", predicted_infer, actual_infer)):
            if predicted > 0.5 and actual > 0:  # tiny tasks say more about noise than about throughput
                ratio = min(10.0, max(0.1, actual / predicted))
                setattr(self, name, (1 - self.weight) * getattr(self, name) + self.weight * ratio)


@dataclass
class Planner:
    """Assigns levels to tasks under a capacity of worker-seconds (a multiple-choice knapsack, solved greedily
    by the best gain per second among whole-level upgrades, which copes with S-shaped values). First up to the
    base level (`base_steps`, `base_views`: --steps, --augs) so every task has its share; then, with what is
    left, by the same rule up to the caps (`max_steps`, `max_views`: the scale-up; equal caps: none)."""

    profile: Profile
    base_steps: int
    base_views: int
    max_steps: int | None = None  # None: the base (no scale-up)
    max_views: int | None = None
    score_views: int = 0  # the search settings inference will run with (what a view costs)
    search: str = "greedy"
    difficulty: Difficulty = field(default_factory=Difficulty)
    corrections: Corrections = field(default_factory=Corrections)

    def __post_init__(self) -> None:
        self.max_steps = max(self.base_steps, self.max_steps or self.base_steps)
        self.max_views = max(self.base_views, self.max_views or self.base_views)
        self.options = levels(self.max_steps, self.max_views, self.base_steps, self.base_views)
        self.in_base = np.array([lv.steps <= self.base_steps and lv.views <= self.base_views for lv in self.options])

    def costs(self, est: TaskEstimate, level: Level) -> tuple[float, float]:
        """(training seconds, inference seconds) of a task at a level, corrected by what the run measured."""
        if level.views == 0:
            return 0.0, 0.0
        train = self.profile.train_seconds(level.steps, est.step_tokens) * self.corrections.train
        infer = (self.view_seconds(est, level.views) + self.profile.task_overhead_s) * self.corrections.infer
        return train, infer

    def view_seconds(self, est: TaskEstimate, views: int) -> float:
        """Inference of a task with `views` decoding views, as the run's search and score views will do it."""
        return self.profile.infer_seconds(views, est.prompt_tokens, est.decode_tokens, est.tests, self.score_views,
                                          self.search)

    def observe(self, est: TaskEstimate, record: TaskRecord) -> None:
        """Correct the costs of the tasks still to come by what this one really took (the steps it really ran:
        a task stopped early by convergence hands its time back, it does not make training look faster)."""
        if record.ttt_seconds is None:  # the model never ran: nothing measured
            return
        self.corrections.update(self.profile.train_seconds(record.ttt_steps, est.step_tokens), record.ttt_seconds,
                                self.view_seconds(est, record.planned_views or 0) + self.profile.task_overhead_s,
                                record.infer_seconds + record.vote_seconds)

    def table(self, est: TaskEstimate) -> tuple[list[Level], np.ndarray, np.ndarray]:
        seconds = np.array([sum(self.costs(est, lv)) for lv in self.options])
        return self.options, seconds, np.array([self.expected(est, lv) for lv in self.options])

    def expected(self, est: TaskEstimate, level: Level) -> float:
        """Expected solved test outputs of a task at a level."""
        per_test = est.answer_tokens / est.tests
        return est.tests * self.difficulty.solve_chance(per_test, est.shape_known, level.steps, level.views)

    def plan(self, estimates: Sequence[TaskEstimate], capacity: float) -> list[Assignment]:
        """Levels for all tasks within `capacity` worker-seconds, most valuable per second first: up to the
        base level, then the scale-up with what is left."""
        tables = [self.table(e) for e in estimates]
        current = [0] * len(estimates)
        left = upgrade(tables, current, capacity, self.in_base)
        base = list(current)
        if not self.in_base.all():
            upgrade(tables, current, left, np.ones_like(self.in_base))
        assignments = []
        for est, (options, seconds, value), c, b in zip(estimates, tables, current, base):
            assignments.append(Assignment(est.task_id, options[c].steps, options[c].views, float(seconds[c]),
                                          float(value[c]), options[b] if b != c else None))
        return sorted(assignments, key=lambda a: -a.expected / max(a.seconds, 1e-9) if a.runs_model else 0.0)

    def uniform(self, estimates: Sequence[TaskEstimate], capacity: float | None) -> list[Assignment]:
        """One level for every task, in the given order: the largest that fits `capacity` (None: the maximum);
        when even the smallest does not fit them all, the smallest for tasks in order until the time is spent.
        What a run without a budget does, and the baseline the scheduler is benchmarked against."""
        options = sorted((lv for lv, base in zip(self.options, self.in_base) if lv.views and base),
                         key=lambda lv: (lv.steps, lv.views), reverse=True)
        for level in options:
            assignments = [self.assign(e, level) for e in estimates]
            if capacity is None or sum(a.seconds for a in assignments) <= capacity:
                return assignments
        left, chosen = capacity, []
        for est, smallest in zip(estimates, assignments):  # `assignments` now holds the smallest level
            chosen.append(smallest if smallest.seconds <= left else self.assign(est, Level(0, 0)))
            left -= chosen[-1].seconds
        return chosen

    def assign(self, est: TaskEstimate, level: Level) -> Assignment:
        return Assignment(est.task_id, level.steps, level.views, sum(self.costs(est, level)),
                          self.expected(est, level))

    def within(self, est: TaskEstimate, assignment: Assignment, seconds_left: float) -> Assignment:
        """The assignment itself if it fits in `seconds_left`, else the most valuable lower level that does
        (fewer steps, fewer views, at last the fallback): the run never starts what it cannot finish."""
        if assignment.seconds <= seconds_left:
            return assignment
        options, seconds, value = self.table(est)
        ok = seconds <= seconds_left
        best = int(np.where(ok, value + 1e-9 * seconds, -1.0).argmax())
        return self.assign(est, options[best])


def upgrade(tables: list[tuple[list[Level], np.ndarray, np.ndarray]], current: list[int], capacity: float,
            allowed: np.ndarray) -> float:
    """Raise tasks' levels (`current`, indices into each table, changed in place) among the `allowed` ones, the
    best gain per second first, while `capacity` seconds last; returns the seconds left."""
    left = capacity
    heap: list[tuple[float, int, int]] = []

    def push(t: int) -> None:
        _, seconds, value = tables[t]
        c = current[t]
        extra, gain = seconds - seconds[c], value - value[c]
        ok = allowed & (extra > 0) & (gain > 0) & (extra <= left)
        if ok.any():
            ratio = np.where(ok, gain / np.where(ok, extra, 1.0), -1.0)
            best = int(ratio.argmax())
            heapq.heappush(heap, (-float(ratio[best]), t, best))

    for t in range(len(tables)):
        push(t)
    while heap:
        _, t, target = heapq.heappop(heap)
        _, seconds, _ = tables[t]
        extra = seconds[target] - seconds[current[t]]
        if extra > left or target == current[t] or seconds[target] <= seconds[current[t]]:
            push(t)  # stale entry (capacity or level moved on): recompute this task's best upgrade
            continue
        left -= extra
        current[t] = target
        push(t)
    return left


def plan_summary(assignments: Sequence[Assignment], capacity: float, workers: int) -> str:
    used = sum(a.seconds for a in assignments)
    trained = sum(a.steps > 0 for a in assignments)
    inferred = sum(a.runs_model for a in assignments)
    return (f"{len(assignments)} tasks: {trained} trained, {inferred - trained} inference only, "
            f"{len(assignments) - inferred} fallback; expected {format_duration(used / workers)} on {workers} "
            f"worker(s) of {format_duration(capacity / workers)} available; expected solved "
            f"{sum(a.expected for a in assignments):.1f}")

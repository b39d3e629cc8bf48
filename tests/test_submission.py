import json

import numpy as np
import pytest

from kit.atomic import write_json_atomic
from kit.submission import (
    FALLBACK_GRID,
    SubmissionError,
    baseline_attempts,
    build_submission,
    load_submission,
    score_submission,
    solutions_of,
    validate_submission,
)


@pytest.fixture(scope="module")
def truth(arc1_eval):
    return solutions_of(arc1_eval)


def test_true_solutions_score_100_percent(arc1_eval, truth):
    answers = {t.id: [(g, g) for g in t.test_outputs] for t in arc1_eval.tasks}
    submission = build_submission(arc1_eval.test_counts(), answers)
    validate_submission(submission, arc1_eval.test_counts(), "truth")
    score = score_submission(submission, truth)
    assert score.fraction == 1.0 and score.solved == score.total == 419
    assert score.tasks_fully_solved == 400 and score.task_mean == 1.0


def test_either_attempt_counts(arc1_eval, truth):
    task = arc1_eval.tasks[0]
    wrong = np.zeros((1, 1), np.uint8)
    for attempts in ([(wrong, g) for g in task.test_outputs], [(g, wrong) for g in task.test_outputs]):
        score = score_submission(build_submission({task.id: len(attempts)}, {task.id: attempts}),
                                 {task.id: truth[task.id]})
        assert score.fraction == 1.0


def test_test_inputs_score_what_they_should(arc1_eval, truth):
    expected = sum(int(np.array_equal(i, o)) for t in arc1_eval.tasks for i, o in zip(t.test_inputs, t.test_outputs))
    submission = build_submission(arc1_eval.test_counts(), {t.id: baseline_attempts(t) for t in arc1_eval.tasks})
    assert score_submission(submission, truth).solved == expected


def test_half_the_solutions_score_half(arc1_eval, truth):
    """Only the first test output of every task right: the counts must say exactly that."""
    answers = {t.id: [(t.test_outputs[0], t.test_outputs[0])] for t in arc1_eval.tasks}
    score = score_submission(build_submission(arc1_eval.test_counts(), answers), truth)
    assert score.solved == 400 and score.total == 419
    multi = [t.id for t in arc1_eval.tasks if len(t.test_inputs) > 1]
    assert all(score.per_task[i] == (1, len(truth[i])) for i in multi)


def test_missing_answers_get_the_fallback():
    submission = build_submission({"a": 2, "b": 1}, {"a": [(np.ones((1, 2), np.uint8),) * 2]})
    assert submission["a"][0] == {"attempt_1": [[1, 1]], "attempt_2": [[1, 1]]}
    assert submission["a"][1] == {"attempt_1": FALLBACK_GRID, "attempt_2": FALLBACK_GRID}
    assert submission["b"] == [{"attempt_1": FALLBACK_GRID, "attempt_2": FALLBACK_GRID}]
    validate_submission(submission, {"a": 2, "b": 1}, "x")


GOOD = {"a": [{"attempt_1": [[1]], "attempt_2": [[2]]}], "b": [{"attempt_1": [[1]], "attempt_2": [[2]]}] * 2}
COUNTS = {"a": 1, "b": 2}


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("b"), "1 task\\(s\\) missing, first \\['b'\\]"),
    (lambda s: s.update(c=s["a"]), "not in the challenges"),
    (lambda s: s["b"].pop(), "task 'b' needs 2 entries"),
    (lambda s: s.update(a={"attempt_1": [[1]]}), "task 'a' needs 1 entries"),
    (lambda s: s["a"][0].pop("attempt_2"), "exactly attempt_1 and attempt_2"),
    (lambda s: s["a"][0].update(attempt_1=[[1, 2], [3]]), "task 'a' entry 0 attempt_1: row 1"),
    (lambda s: s["a"][0].update(attempt_2=[[11]]), "attempt_2: cell \\[0\\]\\[0\\] is 11"),
])
def test_malformed_submissions_are_refused(mutate, message):
    submission = json.loads(json.dumps(GOOD))
    mutate(submission)
    with pytest.raises(SubmissionError, match=message):
        validate_submission(submission, COUNTS, "sub.json")


def test_atomic_write_then_load(tmp_path):
    path = tmp_path / "out" / "submission.json"
    write_json_atomic(path, GOOD)
    assert load_submission(path, COUNTS) == GOOD
    assert [p.name for p in path.parent.iterdir()] == ["submission.json"]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "submission.json"
    path.write_text(json.dumps(GOOD)[:-7])
    with pytest.raises(SubmissionError, match="submission.json: not valid JSON"):
        load_submission(path, COUNTS)


def test_failed_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "submission.json"
    write_json_atomic(path, GOOD)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert load_submission(path, COUNTS) == GOOD
    assert [p.name for p in tmp_path.iterdir()] == ["submission.json"]

import json

import numpy as np

from kit.record import TaskRecord
from kit.results import ResultsStore
from kit.submission import load_submission

COUNTS = {"a": 1, "b": 2}
BASELINE = {"a": [(np.ones((1, 1), np.uint8),) * 2]}
ANSWER = [(np.full((1, 2), 3, np.uint8), np.full((1, 2), 4, np.uint8))] * 2


def test_the_file_is_complete_from_the_start_and_rewritten_after_every_task(tmp_path):
    out = tmp_path / "submission.json"
    store = ResultsStore(out, COUNTS, BASELINE)
    first = load_submission(out, COUNTS)
    assert first["a"][0]["attempt_1"] == [[1]] and first["b"][1]["attempt_1"] == [[0]]
    store.record(TaskRecord("b", ANSWER, ttt_steps=5))
    assert load_submission(out, COUNTS)["b"][1] == {"attempt_1": [[3, 3]], "attempt_2": [[4, 4]]}
    lines = [json.loads(line) for line in store.log_path.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["task"] == "b" and lines[0]["ttt_steps"] == 5
    assert lines[0]["attempts"] == [[[[3, 3]], [[4, 4]]]] * 2
    assert TaskRecord.from_json(lines[0]).to_json() == lines[0]  # a log line reads back as the record it was


def test_a_new_run_starts_a_new_log(tmp_path):
    out = tmp_path / "submission.json"
    ResultsStore(out, COUNTS, BASELINE).record(TaskRecord("a", BASELINE["a"]))
    store = ResultsStore(out, COUNTS, BASELINE)
    assert store.log_path.read_text() == "" and not store.done


def test_resume_keeps_finished_tasks_and_drops_a_torn_line_and_budget_fallbacks(tmp_path):
    out = tmp_path / "submission.json"
    first = ResultsStore(out, COUNTS, BASELINE)
    first.record(TaskRecord("b", ANSWER, ttt_steps=5))
    first.record(TaskRecord("a", BASELINE["a"], fallback="no time"))
    with open(first.log_path, "a") as f:
        f.write('{"task": "a", "attempts": [[[[7]], [[7')  # killed in the middle of an append
    resumed = ResultsStore(out, COUNTS, BASELINE, resume=True)
    assert resumed.done == {"b"}
    assert load_submission(out, COUNTS)["b"][0] == {"attempt_1": [[3, 3]], "attempt_2": [[4, 4]]}
    assert [json.loads(line)["task"] for line in resumed.log_path.read_text().splitlines()] == ["b"]
    resumed.record(TaskRecord("a", [(np.full((1, 1), 5, np.uint8),) * 2], ttt_steps=1))
    again = ResultsStore(out, COUNTS, BASELINE, resume=True)
    assert again.done == {"a", "b"} and load_submission(out, COUNTS)["a"][0]["attempt_1"] == [[5]]


def test_resume_ignores_tasks_of_another_run(tmp_path):
    out = tmp_path / "submission.json"
    ResultsStore(out, {"z": 1}, {}).record(TaskRecord("z", BASELINE["a"]))
    store = ResultsStore(out, COUNTS, BASELINE, resume=True)
    assert not store.done and set(load_submission(out, COUNTS)) == {"a", "b"}

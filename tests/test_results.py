import json

import numpy as np

from kit.results import ResultsStore
from kit.submission import load_submission

COUNTS = {"a": 1, "b": 2}
BASELINE = {"a": [(np.ones((1, 1), np.uint8),) * 2]}


def test_the_file_is_complete_from_the_start_and_rewritten_after_every_task(tmp_path):
    out = tmp_path / "submission.json"
    store = ResultsStore(out, COUNTS, BASELINE)
    first = load_submission(out, COUNTS)
    assert first["a"][0]["attempt_1"] == [[1]] and first["b"][1]["attempt_1"] == [[0]]
    answer = [(np.full((1, 2), 3, np.uint8), np.full((1, 2), 4, np.uint8))] * 2
    store.record("b", answer, {"ttt_steps": 5})
    assert load_submission(out, COUNTS)["b"][1] == {"attempt_1": [[3, 3]], "attempt_2": [[4, 4]]}
    lines = [json.loads(line) for line in store.log_path.read_text().splitlines()]
    assert lines == [{"task": "b", "ttt_steps": 5}]


def test_a_new_run_starts_a_new_log(tmp_path):
    out = tmp_path / "submission.json"
    ResultsStore(out, COUNTS, BASELINE).record("a", BASELINE["a"], {})
    store = ResultsStore(out, COUNTS, BASELINE)
    assert store.log_path.read_text() == ""

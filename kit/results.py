"""The results store: every finished task is appended to a JSONL log and submission.json is rewritten at once
(atomically), so the file on disk is complete and valid from the first second to the last."""
from __future__ import annotations

import json
from pathlib import Path

from kit.submission import Attempts, build_submission, validate_submission, write_json_atomic


class ResultsStore:
    def __init__(self, out: Path, test_counts: dict[str, int], initial: dict[str, list[Attempts]]):
        """`initial` holds the answers written before any task is solved (the no-model baseline)."""
        self.out = out
        self.log_path = out.with_name(out.stem + ".log.jsonl")
        self.test_counts = test_counts
        self.answers = dict(initial)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("", encoding="utf-8")  # the log describes the submission beside it: this run's
        self.write()

    def record(self, task_id: str, attempts: list[Attempts], details: dict) -> None:
        """Keep a task's answer and its details (steps, losses, candidates, times), then rewrite the file."""
        self.answers[task_id] = attempts
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"task": task_id, **details}) + "\n")
        self.write()

    def submission(self) -> dict:
        return build_submission(self.test_counts, self.answers)

    def write(self) -> None:
        submission = self.submission()
        validate_submission(submission, self.test_counts, str(self.out))
        write_json_atomic(self.out, submission)

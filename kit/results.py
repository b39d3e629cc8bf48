"""The results store: every finished task is appended to a JSONL log (with its attempts) and submission.json is
rewritten at once (atomically), so the file on disk is complete and valid from the first second to the last,
and a killed run can be resumed from its log without redoing a finished task."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kit.atomic import write_json_atomic, write_text_atomic
from kit.grids import to_json
from kit.submission import Attempts, build_submission, validate_submission


class ResultsStore:
    def __init__(self, out: Path, test_counts: dict[str, int], initial: dict[str, list[Attempts]],
                 resume: bool = False):
        """`initial` holds the answers written before any task is solved (the no-model baseline). With `resume`,
        the tasks finished in the log beside `out` keep their answers and count as done; else the log restarts."""
        self.out = out
        self.log_path = log_path(out)
        self.test_counts = test_counts
        self.answers = dict(initial)
        self.done: set[str] = set()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._finished_records() if resume else []
        for record in kept:
            self.answers[record["task"]] = [tuple(np.array(g, dtype=np.uint8) for g in pair)
                                            for pair in record["attempts"]]
            self.done.add(record["task"])
        # The log describes the submission beside it; a torn last line (a kill mid-append) is dropped here.
        write_json_lines(self.log_path, kept)
        self.write()

    def _finished_records(self) -> list[dict]:
        """The log's complete records of this run's tasks that were solved by the model (not budget fallbacks)."""
        records = []
        for record in read_task_records(self.log_path):
            task = record["task"]
            attempts = record.get("attempts") if task in self.test_counts else None
            if isinstance(attempts, list) and len(attempts) == self.test_counts[task] and "fallback" not in record:
                records.append(record)
        return records

    def record(self, task_id: str, attempts: list[Attempts], details: dict, write: bool = True) -> None:
        """Keep a task's answer and its details (steps, losses, candidates, times), then rewrite the file
        (`write` False: the caller writes once after a series). A record with a "fallback" key is a task the
        run gave no model time: a resumed run tries it again."""
        self.answers[task_id] = attempts
        if "fallback" not in details:
            self.done.add(task_id)
        entry = {"task": task_id, **details, "attempts": [[to_json(g) for g in pair] for pair in attempts]}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if write:
            self.write()

    def submission(self) -> dict:
        return build_submission(self.test_counts, self.answers)

    def write(self) -> None:
        submission = self.submission()
        validate_submission(submission, self.test_counts, str(self.out))
        write_json_atomic(self.out, submission)


def read_task_records(path: Path) -> list[dict]:
    """The complete task records of a JSONL log, in order; a torn line (a kill mid-append) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "task" in record:
            records.append(record)
    return records


def log_path(out: Path) -> Path:
    """The per-task JSONL log beside a submission."""
    return out.with_name(out.stem + ".log.jsonl")


def summary_path(out: Path) -> Path:
    """The run summary beside a submission (source, model, device, budget, phases, score)."""
    return out.with_name(out.stem + ".run.json")


def write_json_lines(path: Path, records: list[dict]) -> None:
    """Replace a JSONL file atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))

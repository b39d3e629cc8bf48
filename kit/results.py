"""The results store: every finished task is appended to a JSONL log (with its attempts) and submission.json is
rewritten at once (atomically), so the file on disk is complete and valid from the first second to the last,
and a killed run can be resumed from its log without redoing a finished task."""
from __future__ import annotations

import json
from pathlib import Path

from kit.atomic import write_json_atomic, write_text_atomic
from kit.record import TaskRecord
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
            self.answers[record.task] = record.attempts
            self.done.add(record.task)
        # The log describes the submission beside it; a torn last line (a kill mid-append) is dropped here.
        write_text_atomic(self.log_path, "".join(json.dumps(r.to_json()) + "\n" for r in kept))
        self.write()

    def _finished_records(self) -> list[TaskRecord]:
        """The log's complete records of this run's tasks that were solved by the model (not budget fallbacks)."""
        return [r for r in read_task_records(self.log_path)
                if r.fallback is None and len(r.attempts) == self.test_counts.get(r.task, -1)]

    def record(self, record: TaskRecord, write: bool = True) -> None:
        """Keep a task's answer and its record (steps, losses, candidates, times), then rewrite the file
        (`write` False: the caller writes once after a series). A fallback record is a task the run gave no
        model time: a resumed run tries it again."""
        self.answers[record.task] = record.attempts
        if record.fallback is None:
            self.done.add(record.task)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")
        if write:
            self.write()

    def submission(self) -> dict:
        return build_submission(self.test_counts, self.answers)

    def write(self) -> None:
        submission = self.submission()
        validate_submission(submission, self.test_counts, str(self.out))
        write_json_atomic(self.out, submission)


def read_task_records(path: Path) -> list[TaskRecord]:
    """The complete task records of a JSONL log, in order; a torn line (a kill mid-append) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            data = json.loads(line)
            if isinstance(data, dict) and isinstance(data.get("task"), str):
                records.append(TaskRecord.from_json(data))
        except (json.JSONDecodeError, TypeError, ValueError):
            continue
    return records


def log_path(out: Path) -> Path:
    """The per-task JSONL log beside a submission."""
    return out.with_name(out.stem + ".log.jsonl")


def summary_path(out: Path) -> Path:
    """The run summary beside a submission (source, model, device, budget, phases, score)."""
    return out.with_name(out.stem + ".run.json")

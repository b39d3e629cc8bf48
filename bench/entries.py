"""The results file of a bench that spreads over sessions: JSON lines, one finished unit of work each (a task,
a model's task), rewritten atomically after each; a rerun continues from it, and refuses an entry measured with
other settings rather than mixing the two."""
from __future__ import annotations

import json
from pathlib import Path

from kit.atomic import write_text_atomic


def read_entries(path: Path, bench_args: dict) -> list[dict]:
    """The finished entries in `path` (none if it does not exist), each measured with `bench_args`."""
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}: line {n} is not JSON ({error}); move the file away to start anew")
        if entry.get("args") != bench_args:
            raise SystemExit(f"{path}: line {n} ({entry.get('task')}) was measured with {entry.get('args')}, "
                             f"not {bench_args}; give another --results file")
        entries.append(entry)
    return entries


def write_entries(path: Path, entries: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))

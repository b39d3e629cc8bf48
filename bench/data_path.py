"""Data-path speed: load + validate, augment (8 symmetries x a colour permutation) and tokenise every task
of ARC-AGI-1 eval. Prints seconds per 100 tasks against the 1 s target, measured in one run.

    python bench/data_path.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.augment import NUM_SYMMETRIES, Augmentation, random_colours, task_rng  # noqa: E402
from kit.format import GridFormat  # noqa: E402
from kit.tasks import load_bundled  # noqa: E402
from kit.weights import ensure_default_model, offline_environment  # noqa: E402

TARGET_SECONDS_PER_100 = 1.0


def tokenise_all_views(task_set, fmt: GridFormat) -> int:
    """Every task under 8 symmetries x a colour permutation: its test prompts and its leave-one-out
    training sequences. Returns the number of tokens produced."""
    tokens = 0
    for task in task_set.tasks:
        rng = task_rng(0, task.id, "bench")
        for symmetry in range(NUM_SYMMETRIES):
            aug = Augmentation(symmetry, random_colours(rng))
            train = aug.pairs(task.train)
            for grid in task.test_inputs:
                tokens += len(fmt.encode_prompt(train, aug.grid(grid)))
            for i, query in enumerate(train):
                ids, _ = fmt.encode_example(train[:i] + train[i + 1:], query)
                tokens += len(ids)
    return tokens


def main() -> None:
    offline_environment()
    from transformers import AutoTokenizer

    fmt = GridFormat.from_tokenizer(AutoTokenizer.from_pretrained(ensure_default_model()))
    start = time.perf_counter()
    task_set = load_bundled("arc1-eval")
    loaded = time.perf_counter()
    tokens = tokenise_all_views(task_set, fmt)
    done = time.perf_counter()
    per_100 = (done - start) / len(task_set.tasks) * 100
    print(f"{len(task_set.tasks)} tasks: load+validate {loaded - start:.3f}s, "
          f"augment+tokenise {done - loaded:.3f}s ({tokens / 1e6:.1f}M tokens)")
    print(f"{per_100:.3f} s per 100 tasks; ratio to the {TARGET_SECONDS_PER_100:.0f} s target: "
          f"{per_100 / TARGET_SECONDS_PER_100:.3f} ({'PASS' if per_100 < TARGET_SECONDS_PER_100 else 'FAIL'})")


if __name__ == "__main__":
    main()

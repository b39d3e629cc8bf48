"""DFS across views in one batch against DFS one view at a time: the same answers, and the ratio of their seconds,
measured in one run (the two arms alternate per task, so the machine's noise falls on both).

    python bench/dfs_batch.py [--tasks N] [--steps N] [--augs N] [--threshold P] [--dfs-max K]

Per task (the N smallest held-out ARC-AGI-1 training tasks of kit.pretune, a fresh adapter trained --steps
steps): its first test input's views are prefilled once, then `kit.decode.dfs` runs on all of them together and
on each alone (its own one-row prefix). Prints both times, the answers found, and whether they are the same.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selection import held_out_tasks  # noqa: E402

from kit.augment import task_rng, task_seed  # noqa: E402
from kit.backend.cache import Prefix  # noqa: E402
from kit.config import RunConfig, TTTSettings  # noqa: E402
from kit.decode import dfs  # noqa: E402
from kit.format import answer_budget  # noqa: E402
from kit.infer import inference_views, view_prompts  # noqa: E402
from kit.shapes import plausible_side  # noqa: E402
from kit.ttt import train_task  # noqa: E402
from kit.weights import ensure_default_model  # noqa: E402
from kit.workers import Worker  # noqa: E402


def one_row(prefix: Prefix, row: int) -> Prefix:
    """Row `row` of a prefix, alone, cut to its own length (as if it had been prefilled by itself)."""
    length = int(prefix.lengths[row])
    return Prefix([(k[row:row + 1, :, :length], v[row:row + 1, :, :length]) for k, v in prefix.keys_values],
                  prefix.last_hidden[row:row + 1], prefix.lengths[row:row + 1], prefix.mask[row:row + 1, :length],
                  prefix.legacy)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--tasks", type=int, default=6)
    args.add_argument("--steps", type=int, default=30)
    args.add_argument("--augs", type=int, default=8)
    args.add_argument("--threshold", type=float, default=0.1)
    args.add_argument("--dfs-max", type=int, default=8)
    opts = args.parse_args()
    worker = Worker(RunConfig(model=ensure_default_model(), backend="peft", compile="off"), print)
    backend, fmt = worker.backend, worker.fmt
    batched_s, alone_s, same = 0.0, 0.0, 0
    tasks = held_out_tasks(opts.tasks)
    for task in tasks:
        train_task(backend, fmt, task, TTTSettings(steps=opts.steps, converged_window=0), task_rng(0, task.id, "ttt"),
                   seed=task_seed(0, task.id))
        test_input = task.test_inputs[0]
        side = plausible_side(task, test_input)
        tokens = answer_budget(side)
        _, prompts = view_prompts(fmt, task, test_input, inference_views(np.random.default_rng(0), opts.augs,
                                                                         len(task.train)), tokens, backend.max_length)
        prefix = backend.prefill(prompts)
        start = time.perf_counter()
        together = dfs(backend, prefix, fmt, opts.threshold, tokens, opts.dfs_max, max_side=side)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        alone = [dfs(backend, one_row(prefix, row), fmt, opts.threshold, tokens, opts.dfs_max, max_side=side)[0]
                 for row in range(len(prompts))]
        single = time.perf_counter() - start
        equal = all([tuple(a.tokens) for a in x] == [tuple(a.tokens) for a in y] for x, y in zip(together, alone))
        batched_s, alone_s, same = batched_s + batched, alone_s + single, same + equal
        print(f"{task.id} ({len(prompts)} views, {sum(map(len, together))} answers): batched {batched:.1f} s, "
              f"one view at a time {single:.1f} s ({single / batched:.2f}x), same answers: {equal}", flush=True)
    print(f"all {len(tasks)} tasks: batched {batched_s:.1f} s, one view at a time {alone_s:.1f} s: "
          f"{alone_s / batched_s:.2f}x; same answers on {same}/{len(tasks)}")


if __name__ == "__main__":
    main()

"""The scheduler against uniform allocation: the same tasks, the same budget, the same model, one run.

Both arms go through the kit's runner with the embedded default model and the same deadline rules; they
differ only in how the budget is shared: the planner (cost- and difficulty-aware levels, re-planned as
timings arrive) or one level for every task (the largest that fits, re-fitted as timings arrive). Prints
test outputs solved by each and wall time against the budget.

    python bench/scheduler.py [--count 30] [--budget 8m] [--pick smallest|random] [--steps 60] [--augs 8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.config import InferSettings, RunConfig, TTTSettings  # noqa: E402
from kit.format import task_tokens  # noqa: E402
from kit.runner import run  # noqa: E402
from kit.schedule import format_duration, parse_duration  # noqa: E402
from kit.tasks import load_bundled  # noqa: E402


def pick_tasks(count: int, how: str, seed: int) -> list[str]:
    """Task ids of ARC-1 eval: the `count` smallest (where a 135M model has a chance on a CPU) or a random
    sample, in a shuffled order so that the uniform arm's order carries no hint."""
    tasks = load_bundled("arc1-eval").tasks
    rng = np.random.default_rng(seed)
    chosen = (sorted(tasks, key=task_tokens)[:count] if how == "smallest"
              else [tasks[i] for i in rng.choice(len(tasks), count, replace=False)])
    return [chosen[i].id for i in rng.permutation(len(chosen))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=30)
    p.add_argument("--budget", default="8m")
    p.add_argument("--pick", choices=("smallest", "random"), default="smallest")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--augs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    budget = parse_duration(args.budget)
    ids = pick_tasks(args.count, args.pick, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for allocation in ("plan", "uniform"):
            config = RunConfig(dataset="arc1-eval", tasks=ids, out=Path(tmp) / allocation / "submission.json",
                               budget=budget, allocation=allocation, seed=args.seed,
                               ttt=TTTSettings(steps=args.steps), infer=InferSettings(augs=args.augs))
            start = time.monotonic()
            result = run(config, log=lambda m, a=allocation: print(f"[{a}] {m}", flush=True))
            results[allocation] = (result.score, time.monotonic() - start)
    print(f"\n{args.count} {args.pick} ARC-1 eval tasks, budget {format_duration(budget)} per arm, "
          f"up to {args.steps} steps and {args.augs} views per task")
    for allocation, (score, wall) in results.items():
        print(f"  {allocation:<8} solved {score.solved}/{score.total} test outputs, "
              f"wall {format_duration(wall)} of {format_duration(budget)} ({wall / budget:.0%})")
    (plan, _), (uniform, _) = results["plan"], results["uniform"]
    print(f"scheduler - uniform: {plan.solved - uniform.solved:+d} test outputs "
          f"({'PASS' if plan.solved > uniform.solved else 'FAIL'}: the scheduler must solve more)")


if __name__ == "__main__":
    main()

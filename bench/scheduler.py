"""Two ways of sharing one budget, the same tasks, the same model, one run.

`--compare allocation`: the scheduler against uniform allocation. Both arms go through the kit's runner with
the embedded default model and the same deadline rules; they differ only in how the budget is shared: the
planner (cost- and difficulty-aware levels, re-planned as timings arrive) or one level for every task (the
largest that fits, re-fitted as timings arrive).
`--compare scale-up`: the planner scaling levels up past --steps/--augs where the budget has room (up to
--max-steps/--max-augs) against the same planner capped at them; without --budget, twice what the capped plan
projects for the tasks (so the scaled arm has room to use).
Prints test outputs solved by each arm and wall time against the budget.

    python bench/scheduler.py [--compare allocation|scale-up] [--count 30] [--budget 8m]
                              [--pick smallest|random] [--steps 60] [--augs 8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.config import InferSettings, RunConfig, TTTSettings  # noqa: E402
from kit.format import task_tokens  # noqa: E402
from kit.runner import estimate, load_profile, make_planner, run  # noqa: E402
from kit.schedule import format_duration, parse_duration  # noqa: E402
from kit.tasks import load_bundled  # noqa: E402

ARMS = {"allocation": {"plan": {}, "uniform": {"allocation": "uniform"}},
        "scale-up": {"scaled": {}, "capped": {"max_steps": 0, "max_augs": 0}}}  # 0: capped at the base level


def pick_tasks(count: int, how: str, seed: int) -> list[str]:
    """Task ids of ARC-1 eval: the `count` smallest (where a 135M model has a chance on a CPU) or a random
    sample, in a shuffled order so that the uniform arm's order carries no hint."""
    tasks = load_bundled("arc1-eval").tasks
    rng = np.random.default_rng(seed)
    chosen = (sorted(tasks, key=task_tokens)[:count] if how == "smallest"
              else [tasks[i] for i in rng.choice(len(tasks), count, replace=False)])
    return [chosen[i].id for i in rng.permutation(len(chosen))]


def base_need(config: RunConfig, ids: list[str]) -> float:
    """Seconds the capped plan projects for these tasks at their base level, model load included."""
    planner = make_planner(config, load_profile(config, lambda _: None))
    tasks = load_bundled("arc1-eval").select(ids).tasks
    plan = planner.uniform([estimate(config, t) for t in tasks], None)
    return planner.profile.model_load_s + sum(a.seconds for a in plan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=tuple(ARMS), default="allocation")
    p.add_argument("--count", type=int, default=30)
    p.add_argument("--budget", help="per arm (default: 8m; with --compare scale-up twice the base level's need)")
    p.add_argument("--pick", choices=("smallest", "random"), default="smallest")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--augs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ids = pick_tasks(args.count, args.pick, args.seed)
    base = RunConfig(dataset="arc1-eval", tasks=ids, seed=args.seed, ttt=TTTSettings(steps=args.steps),
                     infer=InferSettings(augs=args.augs))
    if args.budget:
        budget = parse_duration(args.budget)
    else:
        budget = 2 * base_need(base, ids) if args.compare == "scale-up" else parse_duration("8m")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, changes in ARMS[args.compare].items():
            config = replace(base, out=Path(tmp) / arm / "submission.json", budget=budget, **changes)
            start = time.monotonic()
            result = run(config, log=lambda m, a=arm: print(f"[{a}] {m}", flush=True))
            results[arm] = (result.score, time.monotonic() - start)
    print(f"\n{args.count} {args.pick} ARC-1 eval tasks, budget {format_duration(budget)} per arm, "
          f"base level {args.steps} steps and {args.augs} views per task")
    for arm, (score, wall) in results.items():
        print(f"  {arm:<8} solved {score.solved}/{score.total} test outputs, "
              f"wall {format_duration(wall)} of {format_duration(budget)} ({wall / budget:.0%})")
    (first, (a, _)), (second, (b, _)) = results.items()
    print(f"{first} - {second}: {a.solved - b.solved:+d} test outputs "
          f"({'PASS' if a.solved > b.solved else 'FAIL'}: {first} must solve more)")


if __name__ == "__main__":
    main()

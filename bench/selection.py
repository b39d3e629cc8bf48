"""Candidate search and selection, measured on tasks the evaluation never sees: the ARC-AGI-1 training tasks that
`kit.pretune` holds out. Per task the adapter is trained once per TTT loss setting; every search and scoring
setting then runs on that same adapter, so the table compares them on equal training, in one run.

    python bench/selection.py [--tasks N] [--steps N] [--augs N] [--thresholds P ...] [--score-views N]

Per setting: oracle (share of test outputs whose right answer is among the candidates), two-attempt accuracy
under each ranking rule of kit/vote.py, candidates per test input, and seconds per task (TTT + that setting's
inference). Settings: greedy against DFS at each threshold, scored under the decoding views only or under
--score-views views (fresh ones added), for TTT loss on the query output and on every output.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kit.augment import task_rng, task_seed  # noqa: E402
from kit.config import InferSettings, RunConfig, TTTSettings  # noqa: E402
from kit.format import task_tokens  # noqa: E402
from kit.infer import predict  # noqa: E402
from kit.pretune import PretuneSettings, training_tasks  # noqa: E402
from kit.ttt import train_task  # noqa: E402
from kit.vote import RANK_BY, rank, two_attempts  # noqa: E402
from kit.weights import ensure_default_model  # noqa: E402
from kit.workers import Worker  # noqa: E402


@dataclass
class Tally:
    """What one setting did over the tasks so far (two-attempt accuracy under every ranking rule: ranking is
    free once the candidates are scored)."""
    outputs: int = 0
    oracle: int = 0
    solved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RANK_BY, 0))
    candidates: int = 0
    seconds: list[float] = field(default_factory=list)

    def row(self, name: str) -> str:
        n = max(self.outputs, 1)
        solved = " | ".join(f"{k}/{self.outputs} ({k / n:.0%})" for k in self.solved.values())
        return (f"| {name} | {self.oracle}/{self.outputs} ({self.oracle / n:.0%}) | {solved} "
                f"| {self.candidates / n:.1f} | {np.mean(self.seconds or [0]):.1f} |")


def held_out_tasks(count: int) -> list:
    """The `count` smallest (by tokens) of the ARC-AGI-1 training tasks kit.pretune holds out by default."""
    _, held, _ = training_tasks(PretuneSettings(sets=["arc1-train"]), log=lambda _: None)
    return sorted(held, key=task_tokens)[:count]


def searches(thresholds: list[float], score_views: int, augs: int) -> dict[str, InferSettings]:
    base = InferSettings(augs=augs)
    settings = {"greedy": base}
    settings |= {f"dfs p={p:g}": replace(base, search="dfs", dfs_threshold=p) for p in thresholds}
    if score_views > augs:
        settings |= {f"{name} + {score_views} score views": replace(s, score_views=score_views)
                     for name, s in list(settings.items())}
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40, help="the N smallest of the 40 held-out tasks")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--augs", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.1, 0.2])
    parser.add_argument("--score-views", type=int, default=16)
    parser.add_argument("--loss-on", nargs="*", default=["query", "outputs"])
    args = parser.parse_args()
    tasks = held_out_tasks(args.tasks)
    config = RunConfig(model=ensure_default_model(lambda _: None), backend="peft", compile="off",
                       ttt=TTTSettings(steps=args.steps))
    worker = Worker(config, log=lambda _: None)
    settings = searches(args.thresholds, args.score_views, args.augs)
    tallies = {(loss, name): Tally() for loss in args.loss_on for name in settings}
    for n, task in enumerate(tasks, 1):
        for loss in args.loss_on:
            run = replace(config, ttt=replace(config.ttt, loss_on=loss))
            run, _ = worker.memory.plan_task(task, run)
            ttt = train_task(worker.backend, worker.fmt, task, run.ttt, task_rng(run.seed, task.id, "ttt"),
                             task_seed(run.seed, task.id))
            for name, infer in settings.items():
                infer = replace(infer, batch_size=run.infer.batch_size, merge_adapter=run.infer.merge_adapter)
                rng, start = task_rng(run.seed, task.id, "infer"), time.monotonic()
                tally = tallies[loss, name]
                with worker.backend.merged_adapter() if infer.merge_adapter else nullcontext():
                    for test_input, truth in zip(task.test_inputs, task.test_outputs):
                        candidates = predict(worker.backend, worker.fmt, task, test_input, infer, rng)
                        tally.outputs += 1
                        tally.candidates += len(candidates)
                        tally.oracle += any(np.array_equal(c.grid, truth) for c in candidates)
                        for rule in RANK_BY:
                            attempts = two_attempts(rank(candidates, rule), test_input)
                            tally.solved[rule] += any(np.array_equal(a, truth) for a in attempts)
                tally.seconds.append(ttt.seconds + time.monotonic() - start)
        # the table so far after every task: a long run that is stopped still says what it measured
        print(f"\n{n} of {len(tasks)} held-out ARC-AGI-1 training tasks ({' '.join(t.id for t in tasks[:n])}), "
              f"{args.steps} TTT steps, {args.augs} decoding views")
        print("| TTT loss, search, scoring | oracle | " + " | ".join(f"two attempts ({r})" for r in RANK_BY)
              + " | candidates per test input | seconds per task |")
        print("|---|---|" + "---|" * len(RANK_BY) + "---|---|")
        for (loss, name), tally in tallies.items():
            print(tally.row(f"{loss}, {name}"))
        sys.stdout.flush()


if __name__ == "__main__":
    main()

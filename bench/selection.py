"""Candidate search and selection, measured on tasks the evaluation never sees: the ARC-AGI-1 training tasks that
`kit.pretune` holds out. Per task the adapter is trained once per TTT loss setting; every search and scoring
setting then runs on that same adapter, so the table compares them on equal training, in one run.

    python bench/selection.py [--tasks N] [--steps N] [--augs N] [--thresholds P ...] [--score-views N]
                              [--results FILE]

Per setting: oracle (share of test outputs whose right answer is among the candidates), two-attempt accuracy
under each ranking rule of kit/vote.py, candidates per test input, and seconds per task (TTT + that setting's
inference). Settings: greedy against DFS at each threshold, scored under the decoding views only or under
--score-views views (fresh ones added), for TTT loss on the query output and on every output.

All 40 tasks take hours on a CPU: each finished task's figures are added to --results (JSON lines, rewritten
atomically), and a rerun with the same settings skips the tasks already there, so the measurement can be spread
over several sessions (the default file is tracked: commit it after a run); the table is always of every task in
the file. Each entry names the adapter merged into the default model it ran on (the default changed from
smollm2-arc-r8 to smollm2-arc-r8-long after the first 13 tasks): the settings are compared task by task on one
adapter, and the table's header says how many tasks each adapter measured.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.entries import read_entries, write_entries  # noqa: E402
from kit.augment import task_rng, task_seed  # noqa: E402
from kit.config import InferSettings, RunConfig, TTTSettings  # noqa: E402
from kit.format import task_tokens  # noqa: E402
from kit.infer import decode_candidates, fresh_views, score_under_views  # noqa: E402
from kit.pretune import PretuneSettings, training_tasks  # noqa: E402
from kit.ttt import train_task  # noqa: E402
from kit.vote import RANK_BY, rank, two_attempts  # noqa: E402
from kit.weights import DEFAULT_ADAPTER, ensure_default_model  # noqa: E402
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

    def add(self, figures: dict) -> None:
        """Add one task's figures of this setting (as `task_figures` makes them)."""
        self.outputs += figures["outputs"]
        self.oracle += figures["oracle"]
        self.candidates += figures["candidates"]
        self.seconds.append(figures["seconds"])
        for rule in RANK_BY:
            self.solved[rule] += figures["solved"][rule]

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
    """Greedy and DFS at each threshold, each drawing `score_views` - `augs` fresh score views."""
    base = InferSettings(augs=augs, score_views=max(score_views, augs))
    return {"greedy": base} | {f"dfs p={p:g}": replace(base, search="dfs", dfs_threshold=p) for p in thresholds}


def setting_names(thresholds: list[float], score_views: int, augs: int) -> list[str]:
    """Each search scored under its decoding views, then (with fresh views) under `score_views` views."""
    names = list(searches(thresholds, score_views, augs))
    return names + [with_score_views(name, score_views) for name in names] if score_views > augs else names


def with_score_views(search_name: str, score_views: int) -> str:
    """The name of a search's setting scored under fresh views as well (one rule for the table and the figures)."""
    return f"{search_name} + {score_views} score views"


def task_figures(worker: Worker, config: RunConfig, task, loss: str, settings: dict[str, InferSettings]) -> dict:
    """One task's figures under every setting, on one adapter trained with TTT loss on `loss`. Each search decodes
    once; its candidates are scored under the decoding views (the setting without score views), then under the
    fresh views as well (the one with them), so both judge the same candidates and decoding is not paid twice."""
    run = replace(config, ttt=replace(config.ttt, loss_on=loss))
    run, _ = worker.memory.plan_task(task, run)
    ttt = train_task(worker.backend, worker.fmt, task, run.ttt, task_rng(run.seed, task.id, "ttt"),
                     task_seed(run.seed, task.id))
    backend, fmt = worker.backend, worker.fmt
    figures = {}
    for name, infer in settings.items():
        infer = replace(infer, batch_size=run.infer.batch_size, merge_adapter=run.infer.merge_adapter)
        rng, start = task_rng(run.seed, task.id, "infer"), time.monotonic()
        decoding_only, with_fresh = Outcome(), Outcome()
        with backend.merged_adapter() if infer.merge_adapter else nullcontext():
            for test_input, truth in zip(task.test_inputs, task.test_outputs):
                decoded = decode_candidates(backend, fmt, task, test_input, infer, rng)
                score_under_views(backend, fmt, decoded.candidates, decoded.views, decoded.prompts, infer,
                                  prefilled=decoded.prefilled)
                decoding_only.add(decoded.candidates, test_input, truth, time.monotonic() - start)
                views, prompts = fresh_views(fmt, task, test_input, decoded, infer, rng, backend.max_length)
                score_under_views(backend, fmt, decoded.candidates, views, prompts, infer)  # none: nothing to do
                with_fresh.add(decoded.candidates, test_input, truth, time.monotonic() - start)
                start = time.monotonic()
        figures[f"{loss}, {name}"] = decoding_only.figures(ttt.seconds)
        if infer.score_views > infer.augs:
            figures[f"{loss}, {with_score_views(name, infer.score_views)}"] = with_fresh.figures(ttt.seconds)
    return figures


@dataclass
class Outcome:
    """One setting's figures on one task, test input by test input."""
    outputs: int = 0
    oracle: int = 0
    candidates: int = 0
    solved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RANK_BY, 0))
    seconds: float = 0.0

    def add(self, candidates: list, test_input, truth, seconds: float) -> None:
        self.outputs += 1
        self.candidates += len(candidates)
        self.oracle += any(np.array_equal(c.grid, truth) for c in candidates)
        for rule in RANK_BY:
            attempts = two_attempts(rank(candidates, rule), test_input)
            self.solved[rule] += any(np.array_equal(a, truth) for a in attempts)
        self.seconds += seconds

    def figures(self, ttt_seconds: float) -> dict:
        return {"outputs": self.outputs, "oracle": self.oracle, "candidates": self.candidates,
                "solved": self.solved, "seconds": round(ttt_seconds + self.seconds, 2)}


def print_table(entries: list[dict], names: list[str], bench_args: dict) -> None:
    tallies = {name: Tally() for name in names}
    for entry in entries:
        for name, figures in entry["figures"].items():
            tallies[name].add(figures)
    models = Counter(entry.get("model", "?") for entry in entries)
    print(f"\n{len(entries)} held-out ARC-AGI-1 training tasks ({' '.join(e['task'] for e in entries)}), "
          f"{bench_args['steps']} TTT steps, {bench_args['augs']} decoding views; default model's adapter: "
          + ", ".join(f"{Path(name).name} ({n} tasks)" for name, n in models.items()))
    print("| TTT loss, search, scoring | oracle | " + " | ".join(f"two attempts ({r})" for r in RANK_BY)
          + " | candidates per test input | seconds per task |")
    print("|---|---|" + "---|" * len(RANK_BY) + "---|---|")
    for name, tally in tallies.items():
        print(tally.row(name))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40, help="the N smallest of the 40 held-out tasks")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--augs", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.1, 0.2])
    parser.add_argument("--score-views", type=int, default=16)
    parser.add_argument("--loss-on", nargs="*", default=["query", "outputs"])
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "selection.jsonl", metavar="FILE",
                        help="finished tasks' figures, kept across runs and committed so that the next session "
                             "on a fresh machine continues (default: docs/selection.jsonl)")
    args = parser.parse_args()
    bench_args = {"steps": args.steps, "augs": args.augs, "thresholds": args.thresholds,
                  "score_views": args.score_views, "loss_on": args.loss_on}
    entries = read_entries(args.results, bench_args)
    settings = searches(args.thresholds, args.score_views, args.augs)
    names = [f"{loss}, {name}" for loss in args.loss_on
             for name in setting_names(args.thresholds, args.score_views, args.augs)]
    done = {e["task"] for e in entries}
    tasks = [t for t in held_out_tasks(args.tasks) if t.id not in done]
    if entries:
        print(f"{args.results}: {len(entries)} tasks measured before, {len(tasks)} to go")
        print_table(entries, names, bench_args)
    if not tasks:
        return
    config = RunConfig(model=ensure_default_model(lambda _: None), backend="peft", compile="off",
                       ttt=TTTSettings(steps=args.steps))
    worker = Worker(config, log=lambda _: None)
    for task in tasks:
        figures = {}
        for loss in args.loss_on:
            figures |= task_figures(worker, config, task, loss, settings)
        entries.append({"task": task.id, "args": bench_args, "model": DEFAULT_ADAPTER, "figures": figures})
        write_entries(args.results, entries)
        print_table(entries, names, bench_args)  # after every task: a run that is stopped still says what it did


if __name__ == "__main__":
    main()

"""What the steady CPU allocator (`kit.memory.measure.steady_cpu_allocator`: glibc serves every allocation of 1 MiB or
more by mmap) costs in speed and saves in peak memory, measured in one run: the same worker jobs (real tasks,
the default model, TTT and inference) in two fresh processes, one with glibc's default allocator (what the
workers use), one with the steady allocator.

    python bench/cpu_allocator.py [--tasks N] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = ["d5c634a2", "e7639916", "ca8de6ea", "e633a9e5"]  # mid-sized ARC-1 eval tasks


def child(mode: str, task_ids: list[str], steps: int) -> None:
    """One worker in this fresh process: its jobs' seconds and the largest measured peak, as JSON."""
    from kit.config import RunConfig, TTTSettings
    from kit.tasks import load_bundled
    from kit.workers import Job, Worker

    if mode == "steady":
        from kit.memory.measure import steady_cpu_allocator

        steady_cpu_allocator()
    config = RunConfig(backend="peft", ttt=TTTSettings(steps=steps, converged_window=0))
    worker = Worker(config, lambda message: None)
    results = [worker.run(Job(task, steps, 4), lambda message: None)
               for task in load_bundled("arc1-eval").select(task_ids).tasks]
    print(json.dumps({"seconds": sum(r.seconds for r in results),
                      "peak": max(r.memory["peak"] for r in results),
                      "estimated": max(r.memory["estimated_peak"] for r in results)}))


def measure(mode: str, task_ids: list[str], steps: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(steps), "--ids", *task_ids],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1, help="how many of the mid-sized tasks")
    parser.add_argument("--steps", type=int, default=4, help="TTT steps per task")
    parser.add_argument("--child", choices=("default", "steady"), help=argparse.SUPPRESS)
    parser.add_argument("--ids", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.ids, args.steps)
        return
    ids = TASKS[:args.tasks]
    runs: dict[str, list[dict]] = {"default": [], "steady": []}
    for mode in ("default", "steady"):
        runs[mode].append(measure(mode, ids, args.steps))
        print(f"{mode:>8}: {json.dumps(runs[mode][-1])}", flush=True)
    seconds = {m: sum(r["seconds"] for r in rs) for m, rs in runs.items()}
    peak = {m: max(r["peak"] for r in rs) for m, rs in runs.items()}
    estimated = max(r["estimated"] for rs in runs.values() for r in rs)
    print(f"tasks {' '.join(ids)}, {args.steps} TTT steps, 4 views")
    print(f"time: steady/default {seconds['steady'] / seconds['default']:.3f}x "
          f"({seconds['steady']:.1f} s vs {seconds['default']:.1f} s)")
    print(f"peak RSS: steady {peak['steady'] / 2**20:.0f} MiB, default {peak['default'] / 2**20:.0f} MiB "
          f"(ratio {peak['steady'] / peak['default']:.2f}x); largest estimate {estimated / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

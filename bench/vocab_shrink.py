"""What shrinking the vocabulary to the format's 16 tokens buys: TTT tokens/s, decoding time and peak memory of
the packed model against the unshrunk one, each in a fresh process on the same tasks, measured in one run.

The kit already restricts the loss and decoding to the grid tokens, so the shrink saves the embedding rows
(49152 -> 16: 28M of SmolLM2-135M's 135M parameters) rather than LM-head compute.

    python bench/vocab_shrink.py [--tasks N] [--steps N] [--backend peft|unsloth]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = ["66e6c45b", "00576224", "be03b35f", "4cd1b7b2", "e633a9e5"]  # small ARC-1 eval tasks


def child(model_dir: Path, backend_name: str, task_ids: list[str], steps: int) -> None:
    """TTT and decoding on `model_dir` in this fresh process; prints tokens/s, decode seconds, peak bytes."""
    import numpy as np

    from kit.augment import task_rng
    from kit.backend import load_backend
    from kit.config import InferSettings, TTTSettings
    from kit.format import GridFormat
    from kit.infer import predict
    from kit.memory.measure import PeakMemory
    from kit.tasks import load_bundled
    from kit.ttt import train_task

    backend = load_backend(model_dir, backend_name, max_length=2048, log=lambda _: None)
    fmt = GridFormat.from_tokenizer(backend.tokenizer)
    settings = TTTSettings(steps=steps, converged_window=0)
    tokens = train_seconds = decode_seconds = 0.0
    with PeakMemory(backend.device.type) as peak:
        for task in load_bundled("arc1-eval").select(task_ids).tasks:
            result = train_task(backend, fmt, task, settings, task_rng(0, task.id, "ttt"), seed=0)
            tokens, train_seconds = tokens + result.tokens, train_seconds + result.seconds
            start = time.perf_counter()
            predict(backend, fmt, task, task.test_inputs[0], InferSettings(augs=4), np.random.default_rng(0))
            decode_seconds += time.perf_counter() - start
    print(json.dumps({"tokens_per_s": tokens / train_seconds, "decode_s": decode_seconds, "peak": peak.peak,
                      "vocab": len(backend.tokenizer)}))


def measure(model_dir: Path, args: argparse.Namespace) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), "--backend", args.backend,
                           "--steps", str(args.steps), "--ids", *TASKS[:args.tasks]],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="TTT steps per task")
    parser.add_argument("--backend", default="peft", choices=("peft", "unsloth"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.backend, args.ids, args.steps)
        return
    from kit.weights import ensure_default_model, load_base, save_packed

    full = ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, base = load_base(full)
        shrunk = save_packed(model, tokenizer, Path(tmp) / "shrunk", {"base": base, "adapter": None}, shrink=True)
        results = {name: measure(path, args) for name, path in (("full", full), ("shrunk", shrunk))}
    for name, r in results.items():
        print(f"{name:>7}: vocabulary {r['vocab']}, TTT {r['tokens_per_s']:.0f} tok/s, decoding {r['decode_s']:.1f} s, "
              f"peak {r['peak'] / 2**20:.0f} MiB")
    full_r, shrunk_r = results["full"], results["shrunk"]
    print(f"{args.tasks} tasks x {args.steps} TTT steps, 4 views, backend {args.backend}")
    print(f"shrunk/full: TTT tokens/s {shrunk_r['tokens_per_s'] / full_r['tokens_per_s']:.2f}x, decoding time "
          f"{shrunk_r['decode_s'] / full_r['decode_s']:.2f}x, peak memory {shrunk_r['peak'] / full_r['peak']:.2f}x")


if __name__ == "__main__":
    main()

"""The loss curve of a pretuning run, as a figure for docs/: the training loss per step (and its running mean) and
the held-out loss at each evaluation, against steps and training tokens.

    python bench/pretune_curve.py PRETUNE_DIR [--out FILE.png]

PRETUNE_DIR is a `python -m kit.pretune --out` directory: its `pretune.json` once the run has finished, else its
checkpoint's state (a run still under way, or stopped to be resumed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kit.pretune import latest_checkpoint  # noqa: E402

WINDOW = 20  # steps in the running mean (the progress bar's)


def progress(directory: Path) -> dict:
    """losses, held_out [(step, loss)], tokens and the command or settings: from pretune.json, else the checkpoint."""
    summary = directory / "pretune.json"
    if summary.is_file() and "losses" in (data := json.loads(summary.read_text())):
        return {"losses": data["losses"], "held_out": data["held_out_loss"], "tokens": data["training_tokens"],
                "label": data["command"]}
    checkpoint = latest_checkpoint(directory / "checkpoint")
    if checkpoint is None:
        raise SystemExit(f"{directory}: neither a finished pretune.json nor a checkpoint")
    import torch

    state = torch.load(checkpoint / "state.pt", weights_only=False, map_location="cpu")
    return {"losses": state["losses"], "held_out": state["held_out"], "tokens": state["tokens"],
            "label": f"{directory.name}, checkpoint at step {state['step']}"}


def plot(run: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    losses = np.asarray(run["losses"], dtype=float)
    steps = np.arange(1, len(losses) + 1)
    running = np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid") if len(losses) >= WINDOW else losses
    figure = Figure(figsize=(8, 4.5), dpi=100)
    ax = figure.add_subplot()
    ax.plot(steps, losses, color="#bbb", linewidth=0.7, label="training loss per step")
    ax.plot(steps[len(steps) - len(running):], running, color="#1f77b4", label=f"running mean of {WINDOW}")
    held_steps, held_losses = zip(*run["held_out"]) if run["held_out"] else ((), ())
    ax.plot(held_steps, held_losses, "o-", color="#d62728", label="held-out loss (held-out ARC-AGI-1 training tasks)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy per output token")
    tokens_per_step = run["tokens"] / max(len(losses), 1)
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e6,
                                               lambda m: m * 1e6 / tokens_per_step))
    top.set_xlabel("training tokens (millions, at the run's mean tokens per step)")
    ax.legend(fontsize=8, title=f"{len(losses)} steps, {run['tokens'] / 1e6:.2f}M training tokens",
              title_fontsize=8)
    ax.grid(alpha=0.3)
    figure.text(0.01, 0.005, run["label"][:140], fontsize=6, color="#666")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretune_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pretune_loss.png")
    args = parser.parse_args()
    plot(progress(args.pretune_dir), args.out)


if __name__ == "__main__":
    main()

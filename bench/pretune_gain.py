"""Does a pretuned adapter help? The same ARC-AGI-1 training tasks held out from pretuning, the same TTT steps and
views, solved by the base model and by the base with the adapter merged (packed as `kit.pack` does), in one run.

    python bench/pretune_gain.py PRETUNE_DIR [--tasks N] [--steps N] [--augs N]

PRETUNE_DIR is a `python -m kit.pretune --out` directory: its `adapter/` and, in `pretune.json`, the held-out
task ids and the base model.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kit.config import InferSettings, RunConfig, TTTSettings  # noqa: E402
from kit.format import task_tokens  # noqa: E402
from kit.runner import run  # noqa: E402
from kit.tasks import load_bundled  # noqa: E402
from kit.weights import load_base, merge_adapter, save_packed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretune_dir", type=Path)
    parser.add_argument("--tasks", type=int, default=12, help="the N smallest held-out tasks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--augs", type=int, default=4)
    args = parser.parse_args()
    summary = json.loads((args.pretune_dir / "pretune.json").read_text())
    held = set(summary["held_out_ids"])
    tasks = sorted((t for t in load_bundled("arc1-train").tasks if t.id in held), key=task_tokens)[:args.tasks]
    ids = [t.id for t in tasks]
    base = Path(summary["model"])
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, described = load_base(base)
        adapter = args.pretune_dir / "adapter"
        pretuned = save_packed(merge_adapter(model, adapter), tokenizer, Path(tmp) / "pretuned",
                               {"base": described, "adapter": str(adapter)}, shrink=False)
        for name, model_dir in (("base", base), ("pretuned", pretuned)):
            config = RunConfig(dataset="arc1-train", tasks=ids, model=model_dir, backend="peft",
                               out=Path(tmp) / name / "submission.json",
                               ttt=TTTSettings(steps=args.steps), infer=InferSettings(augs=args.augs))
            scores[name] = run(config, log=lambda _: None).score
            print(f"{name:>9}: {scores[name].summary()}", flush=True)
    print(f"{len(ids)} held-out ARC-AGI-1 training tasks ({' '.join(ids)}), {args.steps} TTT steps, {args.augs} views")
    print(f"pretuned - base: {scores['pretuned'].solved - scores['base'].solved:+d} test outputs "
          f"({scores['pretuned'].solved}/{scores['pretuned'].total} vs {scores['base'].solved}/{scores['base'].total})")


if __name__ == "__main__":
    main()

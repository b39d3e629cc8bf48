"""Compute dtypes and packed weights: `--dtype` resolution, fp16 training with loss scaling (on a CPU, where
torch's fp16 autocast runs the same code path as a T4's), and the one-line refusal of `--load-in-4bit` without a
GPU, before anything loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_backend import GRID_VOCAB, random_rows, right_padded, save_tiny_llama

from kit.backend import LoraSettings, load_backend, resolve_dtype
from kit.backend.load import default_dtype
from kit.config import SettingError
from kit.ttt import adamw, train_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp16_backend(tmp_path_factory):
    return load_backend(save_tiny_llama(tmp_path_factory.mktemp("tiny")), kind="peft",
                        lora=LoraSettings(rank=4, alpha=8), max_length=128, seed=0, log=lambda _: None, dtype="fp16")


def sequences(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two training sequences as kit.ttt batches them: (ids, labels), loss on each one's tail."""
    ids, labels, mask = right_padded(random_rows(rng, [18, 14]), [8, 6])
    return [(ids[i, :int(mask[i].sum())].numpy(), labels[i, :int(mask[i].sum())].numpy()) for i in range(2)]


def test_dtype_names_resolve_and_auto_follows_the_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == resolve_dtype(None, cpu) == default_dtype(cpu)
    assert [resolve_dtype(n, cpu) for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(SettingError, match="fp8"):
        resolve_dtype("fp8", cpu)


def test_fp16_backend_keeps_frozen_weights_in_fp16_and_the_adapter_in_fp32(fp16_backend) -> None:
    frozen = [p for n, p in fp16_backend.model.named_parameters() if "lora_" not in n]
    assert fp16_backend.dtype == torch.float16 and {p.dtype for p in frozen} == {torch.float16}
    assert {p.dtype for p in fp16_backend.trainable_parameters()} == {torch.float32}
    assert fp16_backend.loss_scaler().is_enabled()


def test_fp16_training_with_loss_scaling_learns_without_overflow(fp16_backend) -> None:
    fp16_backend.reset_lora(1)
    batch = sequences(np.random.default_rng(1))
    eos = GRID_VOCAB[-1]
    vocab = torch.tensor(GRID_VOCAB)
    optimizer = adamw(fp16_backend.trainable_parameters(), 1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = fp16_backend.loss_scaler()
    fp16_backend.train()
    losses = [train_step(fp16_backend, batch, eos, vocab, optimizer, schedule, scaler).loss for _ in range(12)]
    fp16_backend.eval()
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    assert all(torch.isfinite(p).all() for p in fp16_backend.trainable_parameters())
    assert scaler.get_scale() >= 1.0  # the scale stayed in range: steps were taken, not all skipped


def test_a_step_whose_scaled_gradients_overflow_is_skipped(fp16_backend) -> None:
    fp16_backend.reset_lora(2)
    before = [p.detach().clone() for p in fp16_backend.trainable_parameters()]
    optimizer = adamw(fp16_backend.trainable_parameters(), 1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # fp16 activations' gradients overflow
    fp16_backend.train()
    loss = train_step(fp16_backend, sequences(np.random.default_rng(2)), GRID_VOCAB[-1],
                      torch.tensor(GRID_VOCAB), optimizer, schedule, scaler).loss
    fp16_backend.eval()
    assert np.isfinite(loss) and scaler.get_scale() < 2.0 ** 120  # found the overflow, lowered the scale
    assert all(torch.equal(p, q) for p, q in zip(fp16_backend.trainable_parameters(), before))


@pytest.mark.cpu_only
def test_4bit_without_a_gpu_is_refused_in_one_line_before_anything_loads(tmp_path) -> None:
    with pytest.raises(SettingError, match="needs a CUDA GPU"):
        load_backend(tmp_path / "no-model-here", load_in_4bit=True, log=lambda _: None)
    run = subprocess.run([sys.executable, "build_submission.py", "--dataset", "arc1-eval", "--tasks", "66e6c45b",
                          "--load-in-4bit", "--out", str(tmp_path / "submission.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --load-in-4bit needs a CUDA GPU") and "Traceback" not in run.stderr

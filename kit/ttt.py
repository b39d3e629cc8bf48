"""Per-task test-time training: a fresh LoRA learns the task from its own demonstrations.

Leave-one-out sequences under random invertible augmentations, loss on the held-out output and the demonstration
outputs after the first (`TTTSettings.loss_on`, the query's alone or every output as options), batches bucketed by
length (little padding), a plain AdamW loop with linear warm-up/decay that stops at its step budget, its deadline
or convergence of the query output's loss, whichever comes first. Sequences too long for the model lose
demonstrations.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from kit.augment import leave_one_out
from kit.config import TTTSettings
from kit.format import IGNORE, GridFormat, demos_that_fit, grid_tokens
from kit.memory.measure import heap_follows_tensors
from kit.tasks import Task

if TYPE_CHECKING:  # the backend imports torch and transformers; only its type is needed here
    from kit.backend import Backend


@dataclass
class TTTResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    query_losses: list[float] = field(default_factory=list)  # each step's loss on the query outputs alone
    tokens: int = 0
    seconds: float = 0.0
    stopped: str = "steps"  # "steps", "converged", "deadline" or "no data"


Sequence = tuple[np.ndarray, np.ndarray]  # ids, labels


@dataclass
class StepLoss:
    """What one optimiser step saw: its mean loss over every labelled token (what the gradient follows), the
    mean over the query outputs alone (what the convergence stop reads) and the real tokens."""
    loss: float
    query_loss: float
    tokens: int


def training_sequences(fmt: GridFormat, task: Task, count: int, max_length: int, rng: np.random.Generator,
                       keep_background: bool = True, loss_on: str = "query") -> list[Sequence]:
    """`count` encoded leave-one-out examples, loss on the outputs `loss_on` names (`GridFormat.encode_example`);
    demonstrations are dropped where a sequence would be too long, and an example whose query alone is too long
    is left out."""
    sequences = []
    for ex in leave_one_out(task, rng, count, keep_background):
        demos = demos_that_fit(ex.demos, ex.query.input, grid_tokens(ex.query.output.shape) + 1, max_length,
                          bos=fmt.bos_id is not None)
        if demos is not None:
            sequences.append(fmt.encode_example(demos, ex.query, loss_on))
    return sequences


def bucketed_batches(sequences: list[Sequence], batch_size: int, rng: np.random.Generator) -> list[list[Sequence]]:
    """Batches of similar lengths (sorted, then chunked), in random order: padding stays small."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    batches = [[sequences[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(batch: list[Sequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (padding ignored) and attention mask."""
    length = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (seq, lab) in enumerate(batch):
        ids[row, :len(seq)] = torch.from_numpy(seq)
        labels[row, :len(lab)] = torch.from_numpy(lab)
        mask[row, :len(seq)] = 1
    return ids, labels, mask


def train_task(backend: Backend, fmt: GridFormat, task: Task, settings: TTTSettings, rng: np.random.Generator,
               seed: int, deadline: float | None = None) -> TTTResult:
    """Reset the LoRA, then train it on the task. `deadline` is a time.monotonic() instant."""
    start = time.monotonic()
    result = TTTResult()
    backend.reset_lora(seed)
    if settings.steps > 0:
        length = min(backend.max_length, settings.max_length or backend.max_length)
        sequences = training_sequences(fmt, task, settings.steps * settings.batch_size, length, rng,
                                       settings.keep_background, settings.loss_on)
        if sequences:
            batches = bucketed_batches(sequences, settings.batch_size, rng)
            train_on_batches(backend, fmt, batches, settings, deadline, result)
        else:
            result.stopped = "no data"
    result.seconds = time.monotonic() - start
    return result


def train_on_batches(backend: Backend, fmt: GridFormat, batches: list[list[Sequence]], settings: TTTSettings,
        deadline: float | None, result: TTTResult) -> None:
    """The training loop proper: AdamW, linear warm-up then decay, gradient clipping; records into `result`.
    Checkpointed on a CPU, under the steady allocator (`heap_follows_tensors`), which the memory plan assumes."""
    optimizer = adamw(backend.trainable_parameters(), settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=settings.warmup_steps,
                                                                    total=len(batches)))
    vocab = torch.tensor(fmt.grid_vocabulary, dtype=torch.long)
    scaler = backend.loss_scaler()
    backend.train()
    step_seconds = 0.0  # the last step's duration: a step that would end past the deadline is not started
    with heap_follows_tensors(backend.device.type == "cpu" and backend.checkpointing):
        for batch in batches:
            started = time.monotonic()
            if deadline is not None and started + step_seconds >= deadline:
                result.stopped = "deadline"
                break
            step = train_step(backend, batch, fmt.eos_id, vocab, optimizer, schedule, scaler)
            result.steps += 1
            result.losses.append(step.loss)
            result.query_losses.append(step.query_loss)
            result.tokens += step.tokens
            step_seconds = time.monotonic() - started
            if converged(result.query_losses, settings):
                result.stopped = "converged"
                break
    backend.eval()


def adamw(parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay, fused into one kernel (4% of a CPU step was the per-tensor loop).
    Shared by TTT and pretuning."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)


def train_step(backend: Backend, batch: list[Sequence], pad_id: int, vocab: torch.Tensor,
               optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
               scaler: torch.amp.GradScaler, more: Iterable[list[Sequence]] = ()) -> StepLoss:
    """One optimiser step on a batch (loss on labelled tokens within `vocab`, gradients clipped to norm 1), its
    gradients accumulated with those of the `more` batches (each weighted equally: pretuning's accumulation).
    Shared by TTT and pretuning. In fp16 the loss is scaled (`Backend.loss_scaler`) and a step whose gradients
    overflowed is skipped, as torch.amp does."""
    batches = [batch, *more]
    step = StepLoss(0.0, 0.0, 0)
    for micro in batches:
        ids, labels, mask = collate(micro, pad_id)
        log_probs = backend.label_log_probs(ids, labels, mask, vocab)
        loss = -log_probs.mean() / len(batches)
        scaler.scale(loss).backward()
        step.loss += float(loss.detach())
        query = torch.from_numpy(query_terms(micro)).to(log_probs.device)
        step.query_loss += float(-log_probs.detach()[query].mean()) / len(batches)
        step.tokens += int(mask.sum())
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(backend.trainable_parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return step


def query_terms(batch: list[Sequence]) -> np.ndarray:
    """Which of a batch's loss terms (`Backend.label_log_probs`: labelled tokens row by row, the first token
    never predicted) belong to a query output: each sequence ends with its query's, so its trailing labelled run."""
    marks = []
    for _, labels in batch:
        learned = labels[1:] != IGNORE
        query_start = np.flatnonzero(~learned).max(initial=-1) + 1
        marks.append((np.arange(len(learned)) >= query_start)[learned])
    return np.concatenate(marks)


def lr_factor(step: int, warmup: int, total: int, shape: str = "linear") -> float:
    """Linear warm-up to the full learning rate over `warmup` steps, then decay to zero at `total`: linear, or
    along a half cosine (pretuning's longer runs keep the rate high for longer)."""
    if step < warmup:
        return (step + 1) / warmup
    left = max(0.0, (total - step) / max(total - warmup, 1))
    return left if shape == "linear" else 0.5 * (1 - math.cos(math.pi * left))


def converged(query_losses: list[float], settings: TTTSettings) -> bool:
    """The last `converged_window` losses on the query outputs average below `converged_loss`: the adapter
    reproduces held-out outputs, the time is better spent elsewhere. The query's alone, whatever `loss_on`
    trains, so the stop asks the same question under every setting (under outputs loss: 424 -> 419 steps on
    the 10 smallest ARC-1 eval tasks, docs/results.md)."""
    window = settings.converged_window
    return 0 < window <= len(query_losses) and sum(query_losses[-window:]) / window < settings.converged_loss

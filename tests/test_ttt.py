"""The TTT loop on a tiny random Llama: budgets, deadline, convergence, and a fresh adapter for every task."""
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_backend import save_tiny_llama

from kit.augment import task_rng
from kit.backend import load_backend
from kit.config import LoraSettings, TTTSettings
from kit.format import GridFormat
from kit.tasks import Pair, Task
from kit.ttt import adamw, collate, train_step, train_task


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return load_backend(save_tiny_llama(tmp_path_factory.mktemp("tiny")), "peft", LoraSettings(rank=4, alpha=8),
                        max_length=128, log=lambda _: None, dtype=torch.float32)


@pytest.fixture(scope="module")
def fmt(backend):
    return GridFormat.from_tokenizer(backend.tokenizer, "tiny")


def small_task() -> Task:
    rng = np.random.default_rng(0)
    train = [Pair(rng.integers(0, 10, (2, 3), dtype=np.uint8), rng.integers(0, 10, (2, 2), dtype=np.uint8))
             for _ in range(3)]
    return Task("t", train, [train[0].input])


def lora_weights(backend) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backend.trainable_parameters()]


def test_trains_its_step_budget_and_records_losses(backend, fmt):
    result = train_task(backend, fmt, small_task(), TTTSettings(steps=3, batch_size=2, converged_window=0),
                        task_rng(0, "t"), seed=1)
    assert result.steps == 3 and len(result.losses) == 3 and result.stopped == "steps"
    assert result.tokens > 0 and result.seconds > 0


def test_stops_at_the_deadline(backend, fmt):
    """Training that would run 400 steps stops at a deadline about ten steps away: some steps done, none started
    that its last step's duration said would end past the deadline."""
    settings = TTTSettings(steps=400, batch_size=2, converged_window=0)
    warm = train_task(backend, fmt, small_task(), replace(settings, steps=3), task_rng(0, "t"), seed=1)
    step = warm.seconds / warm.steps  # this machine's step time (data included), as loaded as it is now
    assert 400 * step > 0.3 + 10 * step  # the deadline comes long before the step budget
    deadline = time.monotonic() + 0.3 + 10 * step  # 0.3 s for drawing the 800 sequences
    result = train_task(backend, fmt, small_task(), settings, task_rng(0, "t"), seed=1, deadline=deadline)
    ended = time.monotonic()
    assert result.stopped == "deadline" and 0 < result.steps < 400 and len(result.losses) == result.steps
    assert ended - deadline < 3 * step + 0.05  # about one step past it at most


def test_a_steps_query_loss_is_the_loss_of_its_query_outputs_alone(backend, fmt):
    """train_step reports the mean loss over every labelled output (what it trains) and over the query outputs
    alone (what convergence reads): the latter equals the loss of the same batch labelled on the query only."""
    backend.reset_lora(3)
    task = small_task()
    examples = [(task.train[:2], task.train[2]), (task.train[1:], task.train[0])]  # (demonstrations, query)
    batch, query_only = ([fmt.encode_example(demos, query, loss_on) for demos, query in examples]
                         for loss_on in ("outputs", "query"))
    vocab = torch.tensor(fmt.grid_vocabulary)
    backend.train()
    with torch.no_grad():
        expected = [float(backend.loss(*collate(b, fmt.eos_id), vocab)) for b in (batch, query_only)]
    optimizer = adamw(backend.trainable_parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = train_step(backend, batch, fmt.eos_id, vocab, optimizer, schedule, backend.loss_scaler())
    backend.eval()
    assert abs(expected[0] - expected[1]) > 1e-3  # the two means differ on this batch
    assert step.loss == pytest.approx(expected[0], rel=1e-5)
    assert step.query_loss == pytest.approx(expected[1], rel=1e-5)


def test_convergence_reads_the_query_loss(backend, fmt):
    """Under query loss the two records are one; under outputs loss the stop follows the query's."""
    settings = TTTSettings(steps=3, batch_size=2, converged_window=0, loss_on="query")
    result = train_task(backend, fmt, small_task(), settings, task_rng(0, "t"), seed=1)
    assert result.query_losses == pytest.approx(result.losses, rel=1e-5)
    outputs = train_task(backend, fmt, small_task(), replace(settings, loss_on="outputs"), task_rng(0, "t"), seed=1)
    assert len(outputs.query_losses) == 3 and outputs.query_losses != pytest.approx(outputs.losses, rel=1e-3)

    def first_below(losses: list[float], mark: float) -> int:  # the step a window of one stops at (3: none)
        return next((i + 1 for i, loss in enumerate(losses) if loss < mark), 3)

    # a mark between one step's two losses, where a stop on the query's and one on the mean would part
    mark = next(m for m in ((q + a) / 2 for q, a in zip(outputs.query_losses, outputs.losses))
                if first_below(outputs.query_losses, m) != first_below(outputs.losses, m))
    stop = replace(settings, loss_on="outputs", converged_window=1, converged_loss=mark)
    stopped = train_task(backend, fmt, small_task(), stop, task_rng(0, "t"), seed=1)
    assert stopped.steps == first_below(outputs.query_losses, mark)


def test_stops_when_converged(backend, fmt):
    settings = TTTSettings(steps=50, batch_size=2, converged_loss=1e9, converged_window=2)
    result = train_task(backend, fmt, small_task(), settings, task_rng(0, "t"), seed=1)
    assert result.steps == 2 and result.stopped == "converged"


def test_each_task_starts_from_a_fresh_adapter(backend, fmt):
    train_task(backend, fmt, small_task(), TTTSettings(steps=0), task_rng(0, "t"), seed=7)
    fresh = lora_weights(backend)
    assert any(bool(w.any()) for w in fresh)  # A is drawn at random (B starts at zero)
    train_task(backend, fmt, small_task(), TTTSettings(steps=4, batch_size=2, lr=0.05, converged_window=0),
               task_rng(0, "t"), seed=7)
    trained = lora_weights(backend)
    assert all(not torch.equal(t, f) for t, f in zip(trained, fresh))  # every A and B matrix moved
    train_task(backend, fmt, small_task(), TTTSettings(steps=0), task_rng(0, "t"), seed=7)
    assert all(torch.equal(w, f) for w, f in zip(lora_weights(backend), fresh))  # the same fresh adapter, exactly
    train_task(backend, fmt, small_task(), TTTSettings(steps=0), task_rng(0, "t"), seed=8)
    assert all(not torch.equal(w, f) for w, f in zip(lora_weights(backend), fresh) if f.any())  # seeded per task


def test_a_task_too_long_for_the_model_trains_nothing(backend, fmt):
    big = Task("big", [Pair(np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8))] * 2,
               [np.zeros((1, 1), np.uint8)])
    result = train_task(backend, fmt, big, TTTSettings(steps=5), task_rng(0, "big"), seed=1)
    assert result.steps == 0 and result.stopped == "no data"

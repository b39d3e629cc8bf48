"""The data side of TTT: leave-one-out sequences under a length limit, length buckets, padding."""
import numpy as np
import pytest

from kit.augment import task_rng
from kit.config import TTTSettings
from kit.format import IGNORE, GridFormat, demos_that_fit, pair_tokens, sequence_tokens
from kit.tasks import Pair, Task
from kit.ttt import bucketed_batches, collate, converged, lr_factor, query_terms, training_sequences

FMT = GridFormat(digit_ids=tuple(range(10, 20)), row_end_id=1, input_id=2, output_id=3, eos_id=4, bos_id=5)


def task_with_sides(*sides: int) -> Task:
    train = [Pair(np.ones((s, s), np.uint8), np.full((s, s), 2, np.uint8)) for s in sides]
    return Task("t", train, [np.ones((2, 2), np.uint8)])


def test_fit_drops_the_longest_demonstrations_first():
    task = task_with_sides(2, 9, 3, 1)
    query = np.ones((2, 2), np.uint8)
    answer = 7
    full = sequence_tokens(task.train, query) + answer
    assert demos_that_fit(task.train, query, answer, full) == task.train
    kept = demos_that_fit(task.train, query, answer, full - 1)
    assert [p.input.shape[0] for p in kept] == [2, 3, 1]
    assert demos_that_fit(task.train, query, answer, sequence_tokens([], query) + answer) == []
    assert demos_that_fit(task.train, query, answer, 5) is None


def test_training_sequences_respect_max_length_and_mask():
    task = task_with_sides(2, 9, 3, 1)
    limit = 200  # the 9x9 pair alone takes 184 tokens as a query: its context must go
    sequences = training_sequences(FMT, task, 16, limit, task_rng(0, "t"))
    assert len(sequences) == 16
    for ids, labels in sequences:
        assert len(ids) <= limit and len(ids) == len(labels)
        assert labels[-1] == FMT.eos_id and (labels[: -(labels != IGNORE).sum()] == IGNORE).all()


def test_a_query_that_cannot_fit_is_left_out():
    task = task_with_sides(2, 9)
    assert pair_tokens(task.train[1]) > 60
    sequences = training_sequences(FMT, task, 4, 60, task_rng(0, "t"))
    assert len(sequences) == 2  # only the two examples whose query is the small pair


def test_buckets_group_similar_lengths_and_collate_pads_right():
    rng = np.random.default_rng(0)
    sequences = [(np.arange(n), np.arange(n)) for n in rng.permutation(np.arange(10, 30))]
    batches = bucketed_batches(sequences, 4, rng)
    assert sorted(len(ids) for b in batches for ids, _ in b) == list(range(10, 30))
    assert all(max(len(i) for i, _ in b) - min(len(i) for i, _ in b) <= 3 for b in batches)
    ids, labels, mask = collate(batches[0], pad_id=99)
    lengths = [len(i) for i, _ in batches[0]]
    assert ids.shape == (4, max(lengths)) and mask.sum().item() == sum(lengths)
    assert (labels[mask == 0] == IGNORE).all() and (ids[mask == 0] == 99).all()


def test_query_terms_mark_exactly_each_sequences_query_output():
    """Among a batch's loss terms (labelled tokens, row by row, the first token never predicted) the query's are
    each row's last `len(encode_answer(query output))`, whatever the demonstration outputs before them carry."""
    task = task_with_sides(2, 3, 1)
    for loss_on in ("query", "outputs", "all-outputs"):
        batch = [FMT.encode_example(task.train[:2], task.train[2], loss_on),
                 FMT.encode_example(task.train[1:], task.train[0], loss_on)]
        expected = []
        for (_, labels), query in zip(batch, (task.train[2], task.train[0])):
            answer = len(FMT.encode_answer(query.output))
            terms = int((labels[1:] != IGNORE).sum())
            expected += [False] * (terms - answer) + [True] * answer
        assert query_terms(batch).tolist() == expected
        assert (loss_on == "query") == all(expected)


def test_convergence_needs_a_full_window_of_low_losses():
    settings = TTTSettings(converged_loss=0.01, converged_window=3)
    assert not converged([0.001, 0.001], settings)
    assert not converged([0.5, 0.001, 0.001, 0.05], settings)
    assert converged([0.5, 0.001, 0.001, 0.002], settings)
    assert not converged([0.0] * 10, TTTSettings(converged_window=0))


def test_learning_rate_warms_up_to_full_then_decays_to_zero():
    factors = [lr_factor(step, warmup=5, total=60) for step in range(61)]
    assert factors[0] == 0.2 and factors[4] == 1.0 and factors[5] == 1.0
    assert all(a >= b for a, b in zip(factors[5:], factors[6:])) and factors[60] == 0.0


def test_the_cosine_schedule_decays_along_a_half_cosine_from_full_to_zero():
    factors = [lr_factor(step, warmup=5, total=65, shape="cosine") for step in range(66)]
    assert factors[4] == 1.0 and factors[5] == 1.0 and factors[65] == 0.0
    assert factors[35] == pytest.approx(0.5) and factors[20] > lr_factor(20, warmup=5, total=65)  # higher for longer
    assert all(a >= b for a, b in zip(factors[5:], factors[6:]))

"""Augmented inference and selection with a stand-in model: answers produced under each view must be mapped
back to the task's frame, merged into votes, and scored under every view."""
import numpy as np

from kit.augment import task_rng
from kit.config import InferSettings
from kit.format import GridFormat
from kit.infer import predict
from kit.tasks import Pair, Task
from kit.vote import rank, two_attempts

FMT = GridFormat(digit_ids=tuple(range(10, 20)), row_end_id=1, input_id=2, output_id=3, eos_id=4, bos_id=5)


class CopyingModel:
    """Answers every prompt with its query input (the rule of an identity task), except that it garbles the
    answer of every third prompt. Scores an answer by its length, so every view gives a score."""

    def __init__(self):
        self.decoded, self.scored = 0, []

    def generate(self, prompts, vocab, eos_id, max_new_tokens):
        answers = []
        for prompt in prompts:
            query = prompt[np.flatnonzero(prompt == FMT.input_id)[-1] + 1:-1]
            garbled = self.decoded % 3 == 2
            answers.append(np.array([FMT.digit_ids[1], FMT.row_end_id, FMT.digit_ids[1]]) if garbled
                           else np.append(query, eos_id)[:max_new_tokens])
            self.decoded += 1
        return answers

    def score(self, prompts, answers, vocab):
        self.scored += [len(a) for a in answers]
        return -np.array([len(a) for a in answers], dtype=float)


def test_answers_are_inverted_voted_and_scored_under_every_view():
    rng = np.random.default_rng(1)
    train = [Pair(g, g) for g in (rng.integers(0, 10, (2, 5), dtype=np.uint8) for _ in range(3))]
    test_input = rng.integers(0, 10, (3, 4), dtype=np.uint8)
    model = CopyingModel()
    candidates = predict(model, FMT, Task("copy", train, [test_input]), test_input, InferSettings(augs=8),
                         task_rng(0, "copy"))
    assert len(candidates) == 1  # the 8 views' answers, mapped back, agree: one grid
    (best,) = candidates
    assert (best.grid == test_input).all() and best.votes == 6  # two garbled answers were rejected
    # each view scores the answer as it looks there: 3x4 (16 tokens) or, transposed, 4x3 (17 tokens)
    assert sorted(best.view_scores) == [-17.0] * 4 + [-16.0] * 4


def test_a_tiny_decoding_budget_still_gives_two_attempts():
    train = [Pair(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8))]
    test_input = np.full((2, 2), 3, np.uint8)
    candidates = predict(CopyingModel(), FMT, Task("t", train, [test_input]), test_input,
                         InferSettings(augs=2, max_length=14), task_rng(0, "t"))
    attempts = two_attempts(rank(candidates), fallback=test_input)
    assert len(attempts) == 2 and all(a.shape == (2, 2) for a in attempts)

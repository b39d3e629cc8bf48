"""Augmented inference and selection with a stand-in model: answers produced under each view must be mapped
back to the task's frame, merged into votes, and scored under every view."""
import numpy as np
import pytest

from kit.augment import Augmentation, task_rng
from kit.config import InferSettings
from kit.decode import Answer
from kit.format import GridFormat, GridWatch
from kit.infer import batches, predict, score_under_views
from kit.shapes import plausible_side
from kit.tasks import Pair, Task
from kit.vote import Candidate, rank, two_attempts

FMT = GridFormat(digit_ids=tuple(range(10, 20)), row_end_id=1, input_id=2, output_id=3, eos_id=4, bos_id=5)


class CopyingModel:
    """Answers every prompt with its query input (the rule of an identity task), except that it garbles the
    answer of every third prompt. Scores an answer by its length, so every view gives a score."""

    def __init__(self, max_length: int = 10_000):
        self.decoded, self.prefilled, self.scored, self.max_length = 0, [], [], max_length

    def decode(self, prompts, vocab, eos_id, max_new_tokens, deadline=None, give_up=None):
        """Stands in for kit.decode.greedy on the prefix that `prefill` returned (the prompts themselves)."""
        self.watch = give_up.__self__  # predict's GridWatch(...).step
        answers = []
        for prompt in prompts:
            query = prompt[np.flatnonzero(prompt == FMT.input_id)[-1] + 1:-1]
            garbled = self.decoded % 3 == 2
            answers.append(np.array([FMT.digit_ids[1], FMT.row_end_id, FMT.digit_ids[1]]) if garbled
                           else np.append(query, eos_id)[:max_new_tokens])
            self.decoded += 1
        return answers

    def prefill(self, prompts):
        self.prefilled.append(len(prompts))
        return prompts

    def score(self, prefix, prompt_rows, answers, vocab):
        assert all(0 <= row < len(prefix) for row in prompt_rows)
        self.scored.append((list(prompt_rows), [len(a) for a in answers]))
        return -np.array([len(a) for a in answers], dtype=float)


@pytest.fixture(autouse=True)
def stand_in_search(monkeypatch):
    """predict's search runs on the stand-in model."""
    monkeypatch.setattr("kit.infer.greedy", lambda model, prefix, *args: model.decode(prefix, *args))


def test_answers_are_inverted_voted_and_scored_under_every_view():
    rng = np.random.default_rng(1)
    train = [Pair(g, g) for g in (rng.integers(0, 10, (2, 5), dtype=np.uint8) for _ in range(3))]
    test_input = rng.integers(0, 10, (3, 4), dtype=np.uint8)
    model = CopyingModel()
    model_task = Task("copy", train, [test_input])
    candidates = predict(model, FMT, model_task, test_input, InferSettings(augs=8), task_rng(0, "copy"))
    assert model.prefilled == [8]  # the views' prompts run once, for decoding and scoring
    assert isinstance(model.watch, GridWatch) and model.watch.max_side == plausible_side(model_task, test_input)
    assert len(candidates) == 1  # the 8 views' answers, mapped back, agree: one grid
    (best,) = candidates
    assert (best.grid == test_input).all() and best.votes == 6  # two garbled answers were rejected
    # each view scores the answer as it looks there: 3x4 (16 tokens) or, transposed, 4x3 (17 tokens)
    assert sorted(best.view_scores) == [-17.0] * 4 + [-16.0] * 4


def test_dfs_search_gives_every_answer_of_every_view_a_vote(monkeypatch):
    """With --search dfs each view contributes all its answers (here the copy and a 1x1 grid of the background,
    which every view keeps), mapped back and tallied: both candidates get a vote from every view that decoded them
    and are scored under every view."""
    rng = np.random.default_rng(1)
    train = [Pair(g, g) for g in (rng.integers(0, 10, (2, 5), dtype=np.uint8) for _ in range(3))]
    test_input = rng.integers(0, 10, (3, 4), dtype=np.uint8)
    model, calls = CopyingModel(), []

    def two_answers(backend, prefix, fmt, threshold, max_new_tokens, max_answers, deadline, side):
        calls.append((threshold, max_answers, side))
        copies = backend.decode(prefix, fmt.grid_vocabulary, fmt.eos_id, max_new_tokens, deadline,
                                GridWatch(fmt, len(prefix), side).step)  # garbles every third
        return [[Answer(ids, -1.0, True), Answer(fmt.encode_answer(np.zeros((1, 1), np.uint8)), -2.0)]
                for ids in copies]

    monkeypatch.setattr("kit.infer.dfs", two_answers)
    task = Task("copy", train, [test_input])
    candidates = predict(model, FMT, task, test_input, InferSettings(augs=8, search="dfs", dfs_threshold=0.2,
                                                                     dfs_max=3), task_rng(0, "copy"))
    assert calls == [(0.2, 3, plausible_side(task, test_input))]  # one batch of 8 views
    copy, single = candidates
    assert (copy.grid == test_input).all() and copy.votes == 6 and (single.grid == 0).all() and single.votes == 8
    assert len(copy.view_scores) == len(single.view_scores) == 8


def test_fresh_score_views_get_their_own_prompts_after_decodings():
    rng = np.random.default_rng(2)
    train = [Pair(g, g) for g in (rng.integers(0, 10, (2, 3), dtype=np.uint8) for _ in range(2))]
    test_input = rng.integers(0, 10, (2, 2), dtype=np.uint8)
    model = CopyingModel()
    candidates = predict(model, FMT, Task("copy", train, [test_input]), test_input,
                         InferSettings(augs=4, score_views=10), task_rng(0, "copy"))
    assert model.prefilled == [4, 6]  # decoding's prefill reused for its 4 views, one more pass for the 6 fresh
    assert all(len(c.view_scores) == 10 for c in candidates)


def test_decodings_prefill_is_kept_for_scoring_only_where_the_decoding_batch_holds_every_view():
    rng = np.random.default_rng(2)
    train = [Pair(g, g) for g in (rng.integers(0, 10, (2, 3), dtype=np.uint8) for _ in range(2))]
    test_input = rng.integers(0, 10, (2, 2), dtype=np.uint8)
    model = CopyingModel()
    predict(model, FMT, Task("copy", train, [test_input]), test_input, InferSettings(augs=8, batch_size=4),
            task_rng(0, "copy"))
    assert model.prefilled == [4, 4, 4, 4]  # decoding's two groups, then scoring's own


def test_demonstrations_are_dropped_to_leave_room_for_the_answer():
    train = [Pair(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8))]
    test_input = np.full((2, 2), 3, np.uint8)
    task = Task("t", train, [test_input])
    # prompt without the demonstration: BOS I 3 3 / 3 3 / O = 9 tokens; answer budget for side 3: 13 tokens
    model = CopyingModel(max_length=22)
    candidates = predict(model, FMT, task, test_input, InferSettings(augs=2), task_rng(0, "t"))
    assert model.decoded == 2 and (rank(candidates)[0].grid == test_input).all()
    nothing_fits = predict(CopyingModel(max_length=21), FMT, task, test_input, InferSettings(augs=2),
                           task_rng(0, "t"))
    assert nothing_fits == []
    assert all(a.shape == (2, 2) for a in two_attempts(rank(nothing_fits), fallback=test_input))


def test_a_candidate_too_long_for_a_view_gets_no_score_there_instead_of_failing():
    candidate = Candidate(np.ones((1, 6), np.uint8))
    prompts = [np.arange(5), np.arange(5)]
    model = CopyingModel(max_length=5 + 8)  # 1x6 takes 8 tokens with EOS; seen transposed, 6x1 takes 13
    score_under_views(model, FMT, [candidate], [Augmentation(), Augmentation(symmetry=4)], prompts,
                      InferSettings(batch_size=4))
    assert candidate.view_scores == [-8.0, float("-inf")]
    assert candidate.score == -8.0  # judged on the view that scored it, not ranked last for the one that could not


def test_view_prompts_run_once_for_all_candidates_in_bounded_batches():
    candidates = [Candidate(np.ones((1, k), np.uint8)) for k in (1, 2, 3)]  # answers of 3, 4 and 5 tokens
    model = CopyingModel()
    score_under_views(model, FMT, candidates, [Augmentation(), Augmentation(symmetry=2)], [np.arange(5)] * 2,
                      InferSettings(batch_size=4, max_batch_tokens=20))
    assert model.prefilled == [2]  # both prompts in one pass (2 x (5 + 5) tokens), not one per candidate
    # then the 6 (candidate, view) answers, at most 4 rows and 20 padded answer tokens per pass
    assert model.scored == [([0, 0, 0, 1], [3, 4, 5, 3]), ([1, 1], [4, 5])]
    assert [c.view_scores for c in candidates] == [[-3.0] * 2, [-4.0] * 2, [-5.0] * 2]


def test_batches_bound_sequences_and_padded_tokens():
    settings = InferSettings(batch_size=3, max_batch_tokens=100)
    assert batches([10] * 7, settings) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches([40, 40, 60, 200, 10], settings) == [[0, 1], [2], [3], [4]]
    assert [i for chunk in batches([5, 90, 30, 30, 30], settings) for i in chunk] == [0, 1, 2, 3, 4]

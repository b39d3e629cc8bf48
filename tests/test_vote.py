import numpy as np
import pytest

from kit.augment import task_rng
from kit.infer import inference_views
from kit.shapes import plausible_side
from kit.tasks import Pair, Task
from kit.vote import Candidate, rank, tally, two_attempts


def g(*rows):
    return np.array(rows, dtype=np.uint8)


def test_tally_merges_identical_grids_and_tells_shapes_apart():
    grids = [g([1, 2]), g([1], [2]), g([1, 2]), g([3])]
    candidates = tally(grids)
    assert [c.votes for c in candidates] == [2, 1, 1]
    assert candidates[1].grid.shape == (2, 1)


def test_rank_by_score_or_votes():
    many_votes = Candidate(g([1]), votes=5, view_scores=[-3.0, -5.0])
    likely = Candidate(g([2]), votes=1, view_scores=[-1.0, -2.0])
    assert rank([many_votes, likely], "score")[0] is likely
    assert rank([many_votes, likely], "votes")[0] is many_votes
    # combined: likelihood + log votes. -4 + log 5 = -2.39 is below -1.5, above -2.5
    assert rank([many_votes, likely], "combined")[0] is likely
    close = Candidate(g([3]), votes=1, view_scores=[-2.5, -2.5])
    assert rank([many_votes, close], "combined")[0] is many_votes and rank([many_votes, close])[0] is close
    with pytest.raises(ValueError, match="unknown ranking"):
        rank([likely], "coin")


def test_two_attempts_are_always_two_valid_grids():
    fallback = g([0, 0])
    assert [a.tolist() for a in two_attempts([], fallback)] == [[[0, 0]], [[0, 0]]]
    one = Candidate(g([7]), votes=1, view_scores=[-1.0])
    assert [a.tolist() for a in two_attempts([one], fallback)] == [[[7]], [[0, 0]]]


def test_candidate_record_keeps_votes_and_scores():
    record = Candidate(g([1, 2]), votes=3, view_scores=[-1.0, -3.0]).to_record()
    assert record == {"grid": [[1, 2]], "votes": 3, "score": -2.0, "view_scores": [-1.0, -3.0]}


def test_views_start_with_identity_and_cover_the_symmetries():
    views = inference_views(task_rng(0, "t", "infer"), 8, 3)
    assert views[0].describe() == "sym0/col0123456789"
    assert sorted(v.symmetry for v in views) == list(range(8))
    assert all(sorted(v.order) == [0, 1, 2] for v in views[1:])


def test_plausible_side_follows_the_demonstrations_scale():
    upscale = Task("t", [Pair(np.zeros((2, 2), np.uint8), np.zeros((6, 6), np.uint8))], [np.zeros((4, 3), np.uint8)])
    assert plausible_side(upscale, upscale.test_inputs[0]) == 15  # 4 x 3, plus a quarter
    assert plausible_side(upscale, np.zeros((20, 20), np.uint8)) == 30

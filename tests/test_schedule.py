"""The planner: durations, task estimates from shapes alone, level choice under a budget, never late."""
import json

import numpy as np
import pytest

from kit.record import TaskRecord
from kit.schedule import Assignment, Difficulty, Level, Planner, Profile, TaskEstimate, levels, parse_duration
from kit.shapes import expected_output_shape
from kit.tasks import Pair, Task


@pytest.mark.parametrize("text,seconds", [("11h30m", 41400), ("10m", 600), ("90s", 90), ("1h 5m 3s", 3903),
                                          ("45", 45), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "5m garbage", "0s", "-3"])
def test_parse_duration_refuses_nonsense(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def grid(h, w, value=1):
    return np.full((h, w), value, dtype=np.uint8)


def test_expected_output_shape_follows_the_demonstrations_never_the_solution():
    same = Task("s", [Pair(grid(2, 3), grid(2, 3)), Pair(grid(4, 4), grid(4, 4))], [grid(5, 6)], [grid(1, 1)])
    assert expected_output_shape(same, same.test_inputs[0]) == (5, 6)
    const = Task("c", [Pair(grid(2, 3), grid(1, 1)), Pair(grid(4, 4), grid(1, 1))], [grid(5, 6)])
    assert expected_output_shape(const, const.test_inputs[0]) == (1, 1)
    scaled = Task("x", [Pair(grid(2, 3), grid(4, 6)), Pair(grid(1, 1), grid(2, 2))], [grid(3, 3)])
    assert expected_output_shape(scaled, scaled.test_inputs[0]) == (6, 6)
    free = Task("f", [Pair(grid(2, 3), grid(1, 2)), Pair(grid(4, 4), grid(3, 1))], [grid(3, 3)])
    assert expected_output_shape(free, free.test_inputs[0]) is None


def test_estimates_grow_with_the_task_and_ignore_test_outputs(arc1_eval):
    small, large = (arc1_eval.select([i]).tasks[0] for i in ("66e6c45b", "e9b4f6fc"))
    a, b = TaskEstimate.of(small, 4, 2048), TaskEstimate.of(large, 4, 2048)
    assert a.step_tokens < b.step_tokens and a.answer_tokens < b.answer_tokens
    blind = Task(small.id, small.train, small.test_inputs, None)
    assert TaskEstimate.of(blind, 4, 2048) == a
    capped = TaskEstimate.of(large, 4, 256)
    assert capped.step_tokens <= 4 * 256 and capped.prompt_tokens + capped.decode_tokens <= 256 + capped.decode_tokens


def test_value_grows_with_steps_and_views_and_falls_with_answer_size():
    d = Difficulty()
    assert d.solve_chance(20, True, 0, 0) == 0.0
    assert d.solve_chance(20, True, 0, 8) < d.solve_chance(20, True, 32, 8) < d.solve_chance(20, True, 64, 8)
    assert d.solve_chance(20, True, 64, 1) < d.solve_chance(20, True, 64, 8)
    assert d.solve_chance(200, True, 64, 8) < d.solve_chance(20, True, 64, 8)
    assert d.solve_chance(20, False, 64, 8) < d.solve_chance(20, True, 64, 8)


def estimate(task_id, step_tokens=500.0, answer=20.0, tests=1):
    return TaskEstimate(task_id, tests, step_tokens, 150, 30, answer, True)


def test_plan_fits_the_capacity_and_prefers_cheap_small_answers():
    planner = Planner(Profile(), 64, 8)
    cheap = [estimate(f"small{i}", 300, 10) for i in range(5)]
    dear = [estimate(f"big{i}", 3000, 300) for i in range(5)]
    plan = planner.plan(dear + cheap, capacity=600)
    assert sum(a.seconds for a in plan) <= 600
    by_id = {a.task_id: a for a in plan}
    assert all((by_id[e.task_id].steps, by_id[e.task_id].views) == (64, 8) for e in cheap)
    assert max(by_id[e.task_id].expected for e in dear) < min(by_id[e.task_id].expected for e in cheap)
    assert [a.task_id for a in plan[:5]] == sorted(by_id, key=lambda i: -by_id[i].expected / max(
        by_id[i].seconds, 1e-9) if by_id[i].views else 0)[:5]  # most valuable per second first


def test_plan_with_no_time_falls_back_and_with_plenty_gives_the_maximum():
    planner = Planner(Profile(), 64, 8)
    tasks = [estimate(f"t{i}") for i in range(4)]
    assert all(not a.runs_model for a in planner.plan(tasks, 0.0))
    assert all((a.steps, a.views) == (64, 8) for a in planner.plan(tasks, 1e9))


def test_plan_beats_uniform_in_expected_value_at_the_same_capacity():
    planner = Planner(Profile(), 64, 8)
    rng = np.random.default_rng(0)
    tasks = [estimate(f"t{i}", float(rng.uniform(200, 4000)), float(rng.uniform(5, 400))) for i in range(60)]
    capacity = 0.2 * sum(a.seconds for a in planner.uniform(tasks, None))
    planned, uniform = planner.plan(tasks, capacity), planner.uniform(tasks, capacity)
    assert sum(a.seconds for a in planned) <= capacity and sum(a.seconds for a in uniform) <= capacity
    assert sum(a.expected for a in planned) > sum(a.expected for a in uniform)


def test_fit_cuts_an_assignment_down_to_the_time_left():
    planner = Planner(Profile(), 64, 8)
    task = estimate("t")
    full = planner.assign(task, Level(64, 8))
    assert planner.within(task, full, full.seconds + 1) == full
    smaller = planner.within(task, full, full.seconds / 3)
    assert smaller.seconds <= full.seconds / 3 and smaller.runs_model
    assert not planner.within(task, full, 0.01).runs_model


def test_corrections_follow_measured_times():
    planner = Planner(Profile(), 64, 8)
    task = estimate("t")
    before = planner.assign(task, Level(64, 8)).seconds
    train = planner.profile.train_seconds(30, task.step_tokens)
    infer = planner.costs(task, Level(0, 8))[1]
    for _ in range(10):
        planner.observe(task, TaskRecord("t", ttt_steps=30, ttt_seconds=2 * train, planned_views=8,
                                         infer_seconds=2 * infer))
    assert planner.assign(task, Level(64, 8)).seconds == pytest.approx(2 * before, rel=0.05)


def test_levels_start_with_the_fallback_and_end_at_the_maximum():
    options = levels(60, 8)
    assert options[0] == Level(0, 0) and options[-1] == Level(60, 8)
    assert all(lv.steps <= 60 and lv.views <= 8 for lv in options)


def test_profile_round_trip_and_a_bad_profile_names_its_file(tmp_path):
    path = tmp_path / "throughput.json"
    profile = Profile(device="cuda", train_tokens_per_s=9000.0, calibrated=True)
    profile.save(path)
    assert Profile.load(path) == profile
    path.write_text(json.dumps({"train_tokens_per_s": 1.0, "colour": "red"}))
    with pytest.raises(ValueError, match=str(path)):
        Profile.load(path)
    path.write_text(json.dumps({"train_tokens_per_s": 0.0}))
    with pytest.raises(ValueError, match="positive"):
        Profile.load(path)


def test_assignment_without_views_runs_no_model():
    assert not Assignment("t", 0, 0, 0.0, 0.0).runs_model


def test_scale_up_spends_spare_capacity_above_the_base_after_every_task_has_its_share():
    capped, scaled = Planner(Profile(), 64, 8), Planner(Profile(), 64, 8, max_steps=1024, max_views=32)
    rng = np.random.default_rng(1)
    tasks = [estimate(f"t{i}", float(rng.uniform(200, 2000)), float(rng.uniform(5, 200))) for i in range(20)]
    base_need = sum(a.seconds for a in capped.plan(tasks, 1e12))
    for capacity in (0.5 * base_need, 3 * base_need):
        before = {a.task_id: a for a in capped.plan(tasks, capacity)}
        after = scaled.plan(tasks, capacity)
        assert sum(a.seconds for a in after) <= capacity
        for a in after:  # the scale-up starts from exactly what the capped plan gives
            assert (a.base or Level(a.steps, a.views)) == Level(before[a.task_id].steps, before[a.task_id].views)
        assert sum(a.expected for a in after) >= sum(a.expected for a in before.values())
    assert any(a.base is not None for a in after) and max(a.steps for a in after) > 64
    assert sum(a.seconds for a in after) > 0.9 * capacity  # the spare time is spent, not left idle
    assert all(a.steps <= 1024 and a.views <= 32 for a in after)


def test_longer_training_and_more_views_are_worth_something_past_the_base():
    d = Difficulty()
    assert d.solve_chance(100, True, 64, 8) < d.solve_chance(100, True, 256, 8) < d.solve_chance(100, True, 1024, 8)
    assert d.solve_chance(20, True, 64, 8) < d.solve_chance(20, True, 64, 32)


def test_the_planner_prices_dfs_and_fresh_score_views():
    task, level = estimate("t"), Level(32, 8)
    greedy, dfs = Planner(Profile(), 64, 8), Planner(Profile(), 64, 8, search="dfs")
    scored = Planner(Profile(), 64, 8, score_views=16)
    assert greedy.costs(task, level)[0] == dfs.costs(task, level)[0] == scored.costs(task, level)[0]
    assert greedy.costs(task, level)[1] < dfs.costs(task, level)[1]
    assert greedy.costs(task, level)[1] < scored.costs(task, level)[1]
    capacity = 10 * sum(greedy.costs(task, Level(64, 8)))
    tasks = [estimate(f"t{i}") for i in range(20)]
    assert sum(a.seconds for a in dfs.plan(tasks, capacity)) <= capacity  # still inside: a budget stays met

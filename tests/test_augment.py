import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kit.augment import (
    NUM_SYMMETRIES,
    Augmentation,
    apply_symmetry,
    invert_symmetry,
    leave_one_out,
    random_augmentation,
    random_colours,
    task_rng,
)
from kit.tasks import Pair, Task

grids = st.tuples(st.integers(1, 30), st.integers(1, 30)).flatmap(
    lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 9)))
symmetries = st.integers(0, NUM_SYMMETRIES - 1)
seeds = st.integers(0, 2**32 - 1)


def augmentation(seed: int, demos: int = 4, keep_background: bool = True) -> Augmentation:
    return random_augmentation(np.random.default_rng(seed), demos, keep_background)


@given(grids, symmetries)
def test_symmetry_inverts_and_transforms_shape(grid, k):
    out = apply_symmetry(grid, k)
    assert (invert_symmetry(out, k) == grid).all()
    h, w = grid.shape
    assert out.shape == ((h, w) if k in (0, 2, 5, 7) else (w, h))


def test_the_eight_symmetries_are_distinct():
    probe = np.arange(6).reshape(2, 3)
    images = {apply_symmetry(probe, k).tobytes() + bytes(apply_symmetry(probe, k).shape) for k in range(8)}
    assert len(images) == 8


@given(grids, seeds, st.booleans())
def test_augmentation_inverts_exactly(grid, seed, keep_background):
    aug = augmentation(seed, keep_background=keep_background)
    assert (aug.invert_grid(aug.grid(grid)) == grid).all()
    assert (aug.inverse().grid(aug.grid(grid)) == grid).all()


@given(seeds)
def test_background_is_kept_unless_told_otherwise(seed):
    rng = np.random.default_rng(seed)
    colours = random_colours(rng)
    assert colours[0] == 0 and sorted(colours) == list(range(10))
    assert sorted(random_colours(rng, keep_background=False)) == list(range(10))


@given(grids, seeds, seeds)
def test_composition_equals_applying_in_turn(grid, seed_a, seed_b):
    a, b = augmentation(seed_a), augmentation(seed_b)
    assert (a.then(b).grid(grid) == b.grid(a.grid(grid))).all()
    assert (a.then(a.inverse()).grid(grid) == grid).all()


@settings(max_examples=50)
@given(seeds, seeds)
def test_demonstration_order_composes_and_inverts(seed_a, seed_b):
    pairs = [Pair(np.full((1, 1), i, np.uint8), np.full((1, 1), i, np.uint8)) for i in range(5)]
    a, b = augmentation(seed_a, 5), augmentation(seed_b, 5)
    in_turn = b.pairs(a.pairs(pairs))
    composed = a.then(b).pairs(pairs)
    assert [p.input.tolist() for p in in_turn] == [p.input.tolist() for p in composed]
    restored = a.inverse().pairs(a.pairs(pairs))
    assert [p.input.tolist() for p in restored] == [p.input.tolist() for p in pairs]


def small_task(n_train: int) -> Task:
    rng = np.random.default_rng(n_train)
    train = [Pair(rng.integers(0, 10, (2, 3), dtype=np.uint8), rng.integers(0, 10, (3, 2), dtype=np.uint8))
             for _ in range(n_train)]
    return Task("t", train, [train[0].input])


def test_leave_one_out_holds_out_each_demonstration_in_turn():
    task = small_task(3)
    examples = leave_one_out(task, task_rng(0, task.id), 6)
    for i, ex in enumerate(examples):
        held = task.train[i % 3]
        assert len(ex.demos) == 2
        assert (ex.augmentation.invert_grid(ex.query.input) == held.input).all()
        assert (ex.augmentation.invert_grid(ex.query.output) == held.output).all()
        originals = {p.input.tobytes() for p in task.train} - {held.input.tobytes()}
        assert {ex.augmentation.invert_grid(p.input).tobytes() for p in ex.demos} == originals


def test_leave_one_out_with_one_demonstration_has_no_context():
    examples = leave_one_out(small_task(1), task_rng(0, "t"), 2)
    assert all(ex.demos == [] for ex in examples)


def test_randomness_depends_on_seed_and_task_id_only():
    task = small_task(3)

    def signature(seed, task_id):
        return [ex.augmentation.describe() for ex in leave_one_out(task, task_rng(seed, task_id), 8)]

    assert signature(1, "abc") == signature(1, "abc")
    assert signature(1, "abc") != signature(2, "abc")
    assert signature(1, "abc") != signature(1, "abd")

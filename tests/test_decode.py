"""The search policies on a tiny random Llama whose probabilities are known by brute force: DFS finds exactly the
answers above its threshold (every sequence enumerated and scored), holds the greedy answer first, and keeps to
its answer cap and its deadline."""
import itertools
import time

import numpy as np
import pytest
import torch
from test_backend import save_tiny_llama

from kit.augment import random_augmentation, task_rng
from kit.backend import load_backend
from kit.backend.cache import index_in
from kit.config import InferSettings, LoraSettings, TTTSettings
from kit.decode import dfs, greedy
from kit.format import GridFormat, GridWatch, answer_budget
from kit.infer import inference_views, predict, view_prompt
from kit.shapes import plausible_side
from kit.tasks import Pair, Task
from kit.ttt import train_task

MAX_NEW = 4  # answers of up to 4 tokens, EOS included: 1 + 11 + 121 + 1331 sequences to enumerate


def background_task() -> Task:
    """Output: the 1x1 grid [[0]] whatever the input (background: colour permutations keep it; a 3-token answer)."""
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 10, (2, 2), dtype=np.uint8) for _ in range(4)]
    return Task("background", [Pair(g, np.zeros((1, 1), np.uint8)) for g in inputs], [inputs[0]])


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A tiny random Llama taught the background task for a few steps: greedy answers that end within MAX_NEW
    tokens, next to plenty of other answers of known probability."""
    backend = load_backend(save_tiny_llama(tmp_path_factory.mktemp("tiny")), "peft", LoraSettings(rank=4, alpha=8),
                           max_length=128, log=lambda _: None, dtype=torch.float32)
    fmt = GridFormat.from_tokenizer(backend.tokenizer, "tiny")
    settings = TTTSettings(steps=30, batch_size=2, lr=1e-2, converged_window=0)
    result = train_task(backend, fmt, background_task(), settings, task_rng(0, "background"), seed=1)
    assert result.steps == 30
    return backend


@pytest.fixture(scope="module")
def fmt(backend):
    return GridFormat.from_tokenizer(backend.tokenizer, "tiny")


def prompts(fmt: GridFormat, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    task = background_task()
    return [fmt.encode_prompt(task.train[:2], rng.integers(0, 10, (2, 2), dtype=np.uint8)) for _ in range(count)]


def every_valid_answer(fmt: GridFormat) -> list[np.ndarray]:
    """Every sequence over the grid vocabulary of at most MAX_NEW tokens that ends at its first EOS and never
    stops being a possible grid."""
    body_tokens = [t for t in fmt.grid_vocabulary if t != fmt.eos_id]
    answers = []
    for n in range(MAX_NEW):
        for body in itertools.product(body_tokens, repeat=n):
            seq = np.array([*body, fmt.eos_id], np.int64)
            watch = GridWatch(fmt, 1)
            if not any(watch.step(np.array([t]))[0] for t in seq):
                answers.append(seq)
    return answers


def brute_force(backend, fmt: GridFormat, prompt: np.ndarray, answers: list[np.ndarray]) -> np.ndarray:
    """log p(answer | prompt) over the grid vocabulary, for every answer (one prefill, batched scoring)."""
    prefix = backend.prefill([prompt])
    scores = []
    for start in range(0, len(answers), 64):
        chunk = answers[start:start + 64]
        scores.append(backend.score(prefix, [0] * len(chunk), chunk, fmt.grid_vocabulary))
    return np.concatenate(scores)


def greedy_answer(backend, fmt: GridFormat, prompt: np.ndarray) -> np.ndarray | None:
    """The greedy answer where it is a possible grid ending in EOS within MAX_NEW tokens, else None."""
    watch = GridWatch(fmt, 1)
    [out] = greedy(backend, backend.prefill([prompt]), fmt.grid_vocabulary, fmt.eos_id, MAX_NEW, None, watch.step)
    return out if out[-1] == fmt.eos_id and not watch.doomed[0] else None


def test_dfs_finds_exactly_the_answers_above_its_threshold_greedy_first(backend, fmt):
    answers = every_valid_answer(fmt)
    batch = prompts(fmt, 4)
    greedy_found = 0
    for row, prompt in enumerate(batch):
        log_probs = brute_force(backend, fmt, prompt, answers)
        ranked = np.sort(log_probs)[::-1]
        # a threshold half-way (in log space) between the 5th and 6th most likely answers: no borderline case
        threshold = float(np.exp((ranked[4] + ranked[5]) / 2))
        expected = {tuple(a) for a, lp in zip(answers, log_probs) if lp >= np.log(threshold)}
        wanted_greedy = greedy_answer(backend, fmt, prompt)
        if wanted_greedy is not None:
            expected.add(tuple(wanted_greedy))
            greedy_found += 1
        found = dfs(backend, backend.prefill(batch), fmt, threshold, MAX_NEW, max_answers=100)[row]
        assert {tuple(a.tokens) for a in found} == expected and len(found) == len(expected)
        by_answer = {tuple(a): lp for a, lp in zip(answers, log_probs)}
        for answer in found:  # each answer keeps its own log-probability
            assert answer.log_prob == pytest.approx(by_answer[tuple(answer.tokens)], abs=1e-4)
        if wanted_greedy is not None:
            assert found[0].greedy and np.array_equal(found[0].tokens, wanted_greedy)
            assert not any(a.greedy for a in found[1:])
    assert greedy_found >= 2  # the greedy property was checked on prompts that have a greedy answer


def test_dfs_keeps_its_cap_with_the_greedy_answer_and_stops_at_its_deadline(backend, fmt):
    batch = prompts(fmt, 4)
    prefix = backend.prefill(batch)
    wide = dfs(backend, prefix, fmt, 1e-3, MAX_NEW, max_answers=100)
    capped = dfs(backend, prefix, fmt, 1e-3, MAX_NEW, max_answers=2)
    for row, prompt in enumerate(batch):
        assert len(wide[row]) > 2 and len(capped[row]) == 2
        wanted_greedy = greedy_answer(backend, fmt, prompt)
        if wanted_greedy is not None:
            assert capped[row][0].greedy and np.array_equal(capped[row][0].tokens, wanted_greedy)
    assert dfs(backend, prefix, fmt, 1e-6, MAX_NEW, 100, deadline=time.monotonic()) == [[], [], [], []]
    deadline = time.monotonic() + 0.3
    late = dfs(backend, prefix, fmt, 1e-12, 12, 10_000, deadline=deadline)
    assert time.monotonic() - deadline < 0.2  # one step past it at most (a step of the tiny model takes ms)
    assert sum(map(len, late)) < 10_000


def test_dfs_compacting_its_cache_at_every_step_finds_the_same_answers(backend, fmt, monkeypatch):
    """Backtracking leaves dead slots in the batched cache; moving the live ones to the front must change nothing."""
    import kit.decode

    prefix = backend.prefill(prompts(fmt, 3))
    lazy = dfs(backend, prefix, fmt, 1e-3, MAX_NEW, max_answers=100)
    compactions, compacted = [], kit.decode._compacted
    monkeypatch.setattr(kit.decode, "COMPACT_FROM", 0)
    monkeypatch.setattr(kit.decode, "_compacted", lambda *a: compactions.append(1) or compacted(*a))
    eager = dfs(backend, prefix, fmt, 1e-3, MAX_NEW, max_answers=100)
    assert len(compactions) >= 3  # dead slots outnumbered the live ones several times
    for row_lazy, row_eager in zip(lazy, eager):
        assert [tuple(a.tokens) for a in row_lazy] == [tuple(a.tokens) for a in row_eager]
        assert np.allclose([a.log_prob for a in row_lazy], [a.log_prob for a in row_eager], atol=1e-5)


def test_scores_under_fresh_views_equal_a_full_forward_per_pair(backend, fmt):
    """predict with 3 decoding views and 7 score views: every candidate is scored under all 7 (4 of them fresh,
    with their own prompts), each score the log-probability a plain forward of prompt + answer gives."""
    task = background_task()
    test_input = np.array([[3, 1], [4, 1]], np.uint8)
    settings = InferSettings(augs=3, score_views=7, search="dfs", dfs_threshold=0.01, dfs_max=4)
    rng = task_rng(0, "background", "infer")
    candidates = predict(backend, fmt, task, test_input, settings, rng)
    assert candidates and all(len(c.view_scores) == 7 for c in candidates)
    replay = task_rng(0, "background", "infer")  # the same views, drawn again in predict's order
    views = inference_views(replay, 3, len(task.train))
    views += [random_augmentation(replay, len(task.train), symmetry=i % 8) for i in range(3, 7)]
    side = answer_budget(plausible_side(task, test_input))
    for v, view in enumerate(views):
        prompt = view_prompt(fmt, task, test_input, view, side, backend.max_length)
        for candidate in candidates:
            answer = fmt.encode_answer(view.grid(candidate.grid))
            ids = torch.from_numpy(np.concatenate([prompt, answer]))[None]
            with torch.no_grad():
                logits = backend.model(input_ids=ids).logits.float()[0, len(prompt) - 1:-1, fmt.grid_vocabulary]
            expected = logits.log_softmax(-1).gather(1, index_in(torch.from_numpy(answer),
                                                                 torch.tensor(fmt.grid_vocabulary))[:, None]).sum()
            assert candidate.view_scores[v] == pytest.approx(float(expected), abs=1e-3)


def test_dfs_refuses_a_threshold_outside_0_1(backend, fmt):
    prefix = backend.prefill(prompts(fmt, 1))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            dfs(backend, prefix, fmt, bad, MAX_NEW, 10)

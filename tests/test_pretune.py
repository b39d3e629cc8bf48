"""Pretuning: evaluation tasks never reach it (by id, whatever the source), a run killed after a checkpoint
resumes to the very adapter an uninterrupted run makes (a tiny model on real training tasks), and the real
default model pretunes and saves its adapter."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

import kit.pretune
from kit.pretune import PretuneSettings, main, pretune, training_tasks
from kit.tasks import evaluation_ids, load_bundled


def test_evaluation_tasks_never_reach_pretuning_whatever_the_source(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    leaked = load_bundled("arc1-eval").tasks[0]
    raw = {"train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in leaked.train],
           "test": [{"input": g.tolist()} for g in leaked.test_inputs]}
    (extra / f"{leaked.id}.json").write_text(json.dumps(raw))
    settings = PretuneSettings(sets=["arc1-train", "arc2-train"], extra=[extra], hold_out=10)
    train, held, dropped = training_tasks(settings, lambda _: None)
    forbidden = evaluation_ids()
    assert leaked.id in forbidden and dropped >= 377  # arc2-train holds 376 evaluation tasks, plus the leak
    assert not {t.id for t in train + held} & forbidden
    arc1_train = {t.id for t in load_bundled("arc1-train").tasks}
    assert len(held) == 10 and {t.id for t in held} <= arc1_train and not {t.id for t in train} & {t.id for t in held}
    alone = replace(settings, sets=["arc1-train"], extra=[])  # a fixed choice, whatever the other sets
    assert [t.id for t in training_tasks(alone, lambda _: None)[1]] == [t.id for t in held]


def test_embeddings_train_on_peft_only(tmp_path, capsys, tiny_model_dir):
    code = main(["--out", str(tmp_path), "--base", str(tiny_model_dir), "--sets", "arc1-train", "--steps", "1",
                 "--train-embeddings", "--backend", "unsloth"])
    assert code == 2 and "needs --backend peft" in capsys.readouterr().err


def test_the_cli_refuses_an_evaluation_set(capsys):
    with pytest.raises(SystemExit):
        main(["--sets", "arc1-train", "arc1-eval"])
    assert "evaluation sets are never used" in capsys.readouterr().err


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_a_pretune_killed_after_a_checkpoint_resumes_to_the_same_adapter(tmp_path, monkeypatch, tiny_model_dir,
                                                                         train_embeddings):
    """Also with --train-embeddings: the token rows are in the checkpoint, the optimiser's state and the adapter."""
    from safetensors.torch import load_file

    settings = PretuneSettings(base=tiny_model_dir, sets=["arc1-train"], steps=4, batch_size=2, max_length=320,
                               hold_out=2, eval_every=2, save_every=2, backend="peft", warmup_steps=1,
                               train_embeddings=train_embeddings)
    straight = pretune(replace(settings, out=tmp_path / "straight"), log=lambda _: None)

    real_step = kit.pretune.train_step
    calls = []

    def killed_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 2
        return real_step(*args, **kwargs)

    monkeypatch.setattr(kit.pretune, "train_step", killed_at_step_three)
    interrupted = replace(settings, out=tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        pretune(interrupted, log=lambda _: None)
    monkeypatch.setattr(kit.pretune, "train_step", real_step)
    messages = []
    resumed = pretune(replace(interrupted, resume=True), log=messages.append)
    assert any("at step 2" in m for m in messages)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    rows = [name for name in a if "trainable_tokens_delta" in name]
    assert len(rows) == train_embeddings and all(a[name].shape[0] == 16 for name in rows)  # the packed vocabulary
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-6, name
    summary = json.loads((tmp_path / "resumed" / "pretune.json").read_text())
    assert [s for s, _ in summary["held_out_loss"]] == [0, 2, 4] and summary["evaluation_tasks_dropped"] == 0
    assert len(summary["losses"]) == 4  # every step's training loss, the killed run's included: the loss curve


@pytest.mark.slow
def test_the_default_model_pretunes_and_saves_an_adapter_of_its_rank(tmp_path):
    from safetensors.torch import load_file

    from kit.weights import ensure_default_model

    settings = PretuneSettings(out=tmp_path / "run", sets=["arc1-train"], steps=2, batch_size=1, max_length=256,
                               hold_out=1, eval_every=2, save_every=2, lora_rank=8, backend="peft", warmup_steps=1)
    adapter = pretune(settings, log=lambda _: None)
    weights = load_file(adapter / "adapter_model.safetensors")
    down = [w for name, w in weights.items() if name.endswith("lora_A.weight")]
    assert down and all(w.shape[0] == 8 for w in down)
    summary = json.loads((tmp_path / "run" / "pretune.json").read_text())
    assert summary["model"] == str(ensure_default_model()) and summary["training_tokens"] > 0
    assert [s for s, _ in summary["held_out_loss"]] == [0, 2]
    assert all(0 < loss < 20 for _, loss in summary["held_out_loss"])


def test_resume_takes_a_whole_staging_checkpoint_when_a_kill_fell_between_remove_and_rename(tmp_path):
    from kit.pretune import latest_checkpoint

    checkpoint, staging = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp"
    assert latest_checkpoint(checkpoint) is None
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"")
    assert latest_checkpoint(checkpoint) is None  # cut short before state.pt: not whole
    (staging / "state.pt").write_bytes(b"")
    assert latest_checkpoint(checkpoint) == staging
    checkpoint.mkdir()
    assert latest_checkpoint(checkpoint) == checkpoint


def test_a_steps_batches_depend_on_the_step_alone_with_gradient_accumulation(smollm2_tokenizer):
    """What makes a resume exact: a fresh stream asked for step 3 draws what a stream that went through steps
    0-2 draws, and with --grad-accum 2 a step holds two consecutive batches of the chunk stream."""
    from kit.format import GridFormat
    from kit.pretune import BatchStream

    fmt = GridFormat.from_tokenizer(smollm2_tokenizer)
    tasks = load_bundled("arc1-train").tasks[:20]
    settings = PretuneSettings(batch_size=2, max_length=2048, grad_accum=2)
    walked = BatchStream(fmt, tasks, settings)
    steps = [walked.step(s) for s in range(12)]  # 24 batches: across a chunk boundary (16)
    fresh = BatchStream(fmt, tasks, settings).step(9)
    assert len(fresh) == 2 and all(len(b) == 2 for b in fresh)
    assert same_batches(fresh, steps[9]) and not same_batches(fresh, steps[8])
    single = BatchStream(fmt, tasks, replace(settings, grad_accum=1))
    assert same_batches([single.step(2 * 9)[0], single.step(2 * 9 + 1)[0]], steps[9])


def same_batches(a: list, b: list) -> bool:
    """Batches of (ids, labels) sequences, equal array by array."""
    import numpy as np

    return len(a) == len(b) and all(len(x) == len(y) and all(
        all(np.array_equal(u, v) for u, v in zip(s, t)) for s, t in zip(x, y)) for x, y in zip(a, b))

"""The runner with the real default model: a budget it ends inside, two CPU worker processes under a small
memory budget; and on a tiny packed model (the run's machinery, not what a model learns): kills that never leave
a broken file, a resume that does not redo finished tasks, a failing task retried smaller then kept at its
baseline, a calibration."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from build_submission import main
from kit.submission import load_submission
from kit.tasks import load_bundled

pytestmark = pytest.mark.slow  # the real default model through the CLI and worker processes

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # what the workers run on
SMALL = ["66e6c45b", "00576224", "be03b35f", "4cd1b7b2", "e633a9e5", "ca8de6ea"]  # smallest ARC-1 eval tasks


def counts(ids):
    return load_bundled("arc1-eval").select(ids).test_counts()


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_name(out.stem + ".log.jsonl").read_text().splitlines()]


def test_a_budget_run_ends_inside_its_budget_and_answers_every_task(tmp_path, capsys):
    budget = 50  # seconds: the model's load (~15 s here), then a share for each task or its fallback
    out = tmp_path / "submission.json"
    start = time.monotonic()
    assert main(["--dataset", "arc1-eval", "--tasks", *SMALL, "--budget", f"{budget}s",
                 "--steps", "16", "--augs", "4", "--backend", "peft", "--out", str(out)]) == 0
    assert time.monotonic() - start < budget
    assert set(load_submission(out, counts(SMALL))) == set(SMALL)
    records = {r["task"]: r for r in log_records(out)}
    assert set(records) == set(SMALL)  # each task: a model answer or a "no time" fallback, never missing
    for r in records.values():  # when each task ran and what it was planned to take, for the report
        assert 0 <= r["started"] <= r["finished"] < budget and r["planned_seconds"] >= 0
    printed = capsys.readouterr().out
    assert "tasks: trained" in printed and "score " in printed and "budget" in printed
    summary = json.loads((tmp_path / "submission.run.json").read_text())
    assert summary["status"] == "finished" and summary["backend"] == "peft" and summary["device"].startswith(DEVICE)
    assert summary["task_ids"] == SMALL and summary["dataset"] == "arc1-eval" and summary["budget_s"] == budget
    assert summary["wall_s"] < budget and summary["score"]["total"] == 6 and summary["phases"]["ttt"] > 0
    assert sum(summary["counts"].values()) == len(SMALL)


def sleep_while_running(out: Path, process: subprocess.Popen, seconds: float, until_finished: int = 0) -> None:
    """Sleep `seconds`, or with `until_finished` until the log holds that many model-answered tasks (at most 5
    minutes), while the run lasts."""
    deadline = time.monotonic() + (300 if until_finished else seconds)
    while time.monotonic() < deadline and process.poll() is None:
        if until_finished and len(finished_records(out)) >= until_finished:
            return
        time.sleep(0.2)


def finished_records(out: Path) -> dict[str, dict]:
    """The log's model-answered tasks (a torn last line from a kill skipped)."""
    path = out.with_name(out.stem + ".log.jsonl")
    records = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "fallback" not in record:
            records[record["task"]] = record
    return records


def test_kills_at_random_moments_leave_a_valid_file_and_resume_finishes_without_redoing(tmp_path, tiny_model_dir):
    out = tmp_path / "submission.json"
    ids = SMALL[:4]
    # 60 steps of the tiny model: a second or two a task, so that kills also fall between and inside tasks
    command = [sys.executable, "build_submission.py", "--dataset", "arc1-eval", "--tasks", *ids, "--steps", "60",
               "--augs", "2", "--backend", "peft", "--model", str(tiny_model_dir), "--out", str(out), "--resume"]
    rng = np.random.default_rng(7)
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
    for n, sig in enumerate(signals):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the last kill waits, where no task has finished yet, for one to finish: resume must have work to keep
        last = n == len(signals) - 1
        sleep_while_running(out, process, float(rng.uniform(4, 10)), until_finished=int(last))
        process.send_signal(sig)
        process.wait(timeout=60)
        assert set(load_submission(out, counts(ids))) == set(ids)  # complete and valid after every kill
    finished_before = finished_records(out)
    assert finished_before
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {len(finished_before)} tasks already done" in done.stdout
    records = log_records(out)
    assert sorted(r["task"] for r in records) == sorted(ids)  # every task once: nothing redone, nothing lost
    for record in records:
        if record["task"] in finished_before:
            assert record == finished_before[record["task"]]
    assert set(load_submission(out, counts(ids))) == set(ids)


def test_a_failing_task_is_retried_smaller_then_keeps_its_baseline(tmp_path, monkeypatch, tiny_model_dir):
    import kit.solve
    from kit.weights import model_positions

    real_solve = kit.solve.solve_task
    calls = []

    def flaky(backend, fmt, task, config, ttt_deadline=None, deadline=None):
        calls.append((task.id, config.ttt.steps, config.ttt.max_length))
        if task.id == SMALL[0]:
            raise RuntimeError("simulated failure")
        if task.id == SMALL[1] and len([c for c in calls if c[0] == SMALL[1]]) == 1:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real_solve(backend, fmt, task, config, ttt_deadline, deadline)

    monkeypatch.setattr(kit.solve, "solve_task", flaky)
    out = tmp_path / "submission.json"
    assert main(["--dataset", "arc1-eval", "--tasks", *SMALL[:2], "--steps", "2", "--augs", "1",
                 "--backend", "peft", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    first, second = log_records(out)
    assert first["error"].count("simulated failure") == 2 and "retried" not in first
    task = load_bundled("arc1-eval").select([SMALL[0]]).tasks[0]
    assert json.loads(out.read_text())[SMALL[0]][0]["attempt_1"] == task.test_inputs[0].tolist()
    assert "OutOfMemoryError" in second["error"] and second["ttt_steps"] == 1
    assert second["retried"]["steps"] == 1 and second["retried"]["max_length"] < model_positions(tiny_model_dir)
    assert [c[1] for c in calls if c[0] == SMALL[1]] == [2, 1]


def test_two_cpu_workers_each_keep_every_task_under_a_small_memory_budget(tmp_path):
    """Two worker processes whose model alone holds most of their budget (bf16 ~1 GB of 2 GiB, fp32 ~1.5 GB of
    2.5 GiB): the plan cuts the batch or the training length (d5c634a2's leave-one-out sequences are 710 tokens)
    and the measured peak of each task stays under; every task answered by one of the two workers. One TTT step is
    enough to see the heap: without the steady allocator around checkpointed training, d5c634a2 peaked at 2.81 GB
    after one step here (fp32), over the 2.5 GiB budget."""
    import torch

    from kit.backend import default_dtype

    budget = 2 * 2**30 if default_dtype(torch.device("cpu")).itemsize == 2 else 2560 * 2**20
    out = tmp_path / "submission.json"
    ids = ["66e6c45b", "d5c634a2", "00576224"]
    done = subprocess.run([sys.executable, "build_submission.py", "--dataset", "arc1-eval", "--tasks", *ids,
                           "--steps", "1", "--augs", "1", "--backend", "peft", "--workers", "2",
                           "--memory", f"{budget // 2**20}MiB", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert list(load_submission(out, counts(ids))) == ids
    records = {r["task"]: r for r in log_records(out)}
    assert set(records) == set(ids) and all("error" not in r and r["ttt_steps"] == 1 for r in records.values())
    assert {r["worker"] for r in records.values()} <= {0, 1}
    for record in records.values():
        assert record["memory"]["peak"] <= record["memory"]["budget"] == budget
    big = records["d5c634a2"]["memory"]
    assert big["train_batch"] * big["train_length"] < 4 * 710
    assert big["merged"] is False  # no room for a merged copy of the weights: inference through the LoRA branch
    summary = json.loads((tmp_path / "submission.run.json").read_text())
    assert summary["backend"] == "peft" and summary["device"].startswith(DEVICE) and summary["workers"] == 2


def test_calibrate_measures_training_as_the_memory_plan_runs_it_and_saves_a_profile(tmp_path, capsys,
                                                                                   tiny_model_dir):
    """`--calibrate` trains its task with the memory plan's batch and checkpointing (a GPU backend loads
    checkpointed, which a run where the batch fits does not pay) and saves a profile the planner can load. On the
    tiny packed model: calibration times the kit's own training, decoding and scoring, whatever the model (those
    have real-model tests of their own), and on the default it takes a minute by design. Eager: compiling costs
    half a minute even here, and the compiled pass has its own tests."""
    out = tmp_path / "submission.json"
    assert main(["--calibrate", "--dataset", "arc1-eval", "--tasks", "66e6c45b", "00576224", "--backend", "peft",
                 "--model", str(tiny_model_dir), "--compile", "off", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "calibrating on 66e6c45b: training batch 4, checkpointing off" in captured.out + captured.err
    profile = json.loads(out.with_name("throughput.json").read_text())
    assert profile["calibrated"] and profile["device"].startswith(DEVICE)
    assert all(profile[k] > 0 for k in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_step_s"))
    assert not out.exists()  # calibration answers nothing

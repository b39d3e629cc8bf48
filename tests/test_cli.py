"""The CLI end to end without a model: the whole I/O path, on real bundled data and on Kaggle-style files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from build_submission import main
from kit.submission import load_submission
from kit.tasks import load_bundled

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dataset,tasks", [("arc1-eval", 400), ("arc2-eval", 120)])
def test_no_model_run_on_a_bundled_set(tmp_path, dataset, tasks):
    out = tmp_path / "submission.json"
    command = [sys.executable, "build_submission.py", "--dataset", dataset, "--no-model", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"({tasks} tasks" in done.stdout and "score " in done.stdout
    task_set = load_bundled(dataset)
    assert len(load_submission(out, task_set.test_counts())) == tasks


def test_kaggle_files_and_task_filter(tmp_path, arc1_eval):
    chosen = arc1_eval.tasks[:3]
    challenges = {t.id: {"train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in t.train],
                         "test": [{"input": g.tolist()} for g in t.test_inputs]} for t in chosen}
    (tmp_path / "c.json").write_text(json.dumps(challenges))
    (tmp_path / "s.json").write_text(json.dumps({t.id: [g.tolist() for g in t.test_outputs] for t in chosen}))
    out = tmp_path / "sub.json"
    ids = [chosen[2].id, chosen[0].id]
    assert main(["--challenges", str(tmp_path / "c.json"), "--solutions", str(tmp_path / "s.json"),
                 "--tasks", *ids, "--out", str(out), "--no-model"]) == 0
    assert list(json.loads(out.read_text())) == ids


def test_bad_file_is_one_clear_error_and_skip_bad_still_answers(tmp_path, capsys):
    bad = {"ok": {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]},
           "broken": {"train": [{"input": [[1]], "output": [[2, 3], [4]]}], "test": [{"input": [[3]]}]}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(bad))
    out = tmp_path / "sub.json"
    assert main(["--challenges", str(path), "--out", str(out), "--no-model"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'broken'" in err and "train[0].output" in err
    assert not out.exists()
    assert main(["--challenges", str(path), "--out", str(out), "--no-model", "--skip-bad"]) == 0
    assert load_submission(out, {"ok": 1, "broken": 1})["broken"][0]["attempt_1"] == [[0]]


def test_a_whole_bundled_set_without_a_budget_gets_the_local_one(capsys):
    from build_submission import parse_args

    assert parse_args([]).budget == 600 and "gets 10m" in capsys.readouterr().out
    assert parse_args(["--dataset", "arc2-eval", "--budget", "90s"]).budget == 90
    assert parse_args(["--tasks", "66e6c45b"]).budget is None  # a chosen few run in full
    assert parse_args(["--no-model"]).budget is None


def test_compile_auto_only_for_cpu_runs_that_train_for_minutes():
    from build_submission import parse_args

    long_run = parse_args(["--budget", "10m"])
    assert long_run.compile == "auto" and long_run.compiles("cpu") and not long_run.compiles("cuda")
    assert not parse_args(["--budget", "2m"]).compiles("cpu")
    assert not parse_args(["--budget", "10m", "--steps", "0"]).compiles("cpu")
    few = parse_args(["--tasks", "a", "b", "--steps", "60"])
    assert not few.compiles("cpu", tasks=2) and few.compiles("cpu", tasks=10)
    assert parse_args(["--budget", "2m", "--compile", "on"]).compiles("cuda")
    assert not parse_args(["--budget", "1h", "--compile", "off"]).compiles("cpu")

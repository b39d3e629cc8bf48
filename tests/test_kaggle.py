"""The Kaggle path without a model: finding inputs under the mount layouts Kaggle has used, the budget of a scoring
rerun against an interactive run, the CLI arguments, the submission that is always left valid, and the offline
install's commands and pins. Fast: no torch."""
import json
import time
from pathlib import Path

import pytest

from kit import kaggle, offline
from kit.submission import load_submission

ROOT = Path(__file__).resolve().parent.parent
TASK = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3, 3]]}, {"input": [[4]]}]}


def model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "config.json", "tokenizer.json"):
        (path / name).write_text("{}")
    return path


@pytest.fixture
def layout(tmp_path, monkeypatch) -> Path:
    """A fake /kaggle with today's nested mounts, an old flat one and a symlinked dataset."""
    root = tmp_path / "kaggle"
    competition = root / "input" / "competitions" / "arc-prize-2025"
    competition.mkdir(parents=True)
    (competition / kaggle.TEST_CHALLENGES).write_text(json.dumps({"t1": TASK}))
    model_dir(root / "input" / "models" / "me" / "arc-model" / "transformers" / "default" / "1")
    wheels = root / "input" / "arc-wheels"
    wheels.mkdir()
    (wheels / "tqdm-4.70.1-py3-none-any.whl").write_text("")
    model_dir(tmp_path / "elsewhere" / "tiny")
    (root / "input" / "datasets" / "me").mkdir(parents=True)
    (root / "input" / "datasets" / "me" / "tiny").symlink_to(tmp_path / "elsewhere" / "tiny")
    (root / "input" / "datasets" / "me" / "again").symlink_to(tmp_path / "elsewhere" / "tiny")  # seen once
    (root / "working").mkdir()
    monkeypatch.setenv(kaggle.ROOT_VARIABLE, str(root))
    monkeypatch.delenv(kaggle.RERUN_VARIABLE, raising=False)
    return root


def test_inputs_are_found_by_content_under_every_mount_layout(layout):
    found = kaggle.find_inputs()
    assert found.root == layout
    assert found.test_challenges == layout / "input" / "competitions" / "arc-prize-2025" / kaggle.TEST_CHALLENGES
    assert found.wheels == [layout / "input" / "arc-wheels"]
    assert [m.relative_to(layout / "input") for m in found.models] == [
        Path("datasets/me/again"), Path("models/me/arc-model/transformers/default/1")]
    assert "arc-wheels" in found.summary()


def test_the_model_is_named_or_the_only_one(layout):
    found = kaggle.find_inputs()
    with pytest.raises(FileNotFoundError, match="name one with MODEL"):
        found.model()
    assert found.model("1").parts[-4:] == ("arc-model", "transformers", "default", "1")
    assert found.model("datasets/me/again").name == "again"
    assert found.model(str(found.models[0])) == found.models[0]
    with pytest.raises(FileNotFoundError, match="no single model folder matches 'gain'"):  # whole folder names only
        found.model("gain")
    with pytest.raises(FileNotFoundError, match="no single model folder matches 'nope'"):
        found.model("nope")
    found.models = found.models[:1]
    assert found.model() == found.models[0]
    found.models = []
    with pytest.raises(FileNotFoundError, match="no model attached"):
        found.model()


def test_one_competition_is_required(layout):
    second = layout / "input" / "arc-prize-2024"
    second.mkdir()
    (second / kaggle.TEST_CHALLENGES).write_text("{}")
    with pytest.raises(FileNotFoundError, match="need exactly one folder"):
        _ = kaggle.find_inputs().competition
    with pytest.raises(FileNotFoundError, match="found none"):
        _ = kaggle.KaggleInputs(layout).competition


def test_scoring_rerun_gets_the_time_left_and_an_interactive_run_its_own_budget(monkeypatch):
    monkeypatch.delenv(kaggle.RERUN_VARIABLE, raising=False)
    assert not kaggle.is_rerun()
    assert kaggle.run_budget("12h", "30m", "10m", age=120) == 600
    assert kaggle.run_budget("12h", "30m", "10m", rerun=True, age=120) == 12 * 3600 - 1800 - 120
    assert kaggle.run_budget("20m", "5m", "10m", age=400) == 15 * 60 - 400  # interactive, capped by the limit
    assert kaggle.time_left("10m", "5m", age=3600) == 1.0  # past the limit: a token budget, baselines only
    monkeypatch.setenv(kaggle.RERUN_VARIABLE, "1")
    assert kaggle.is_rerun()
    assert kaggle.run_budget("12h", "30m", "10m", age=0) == 12 * 3600 - 1800


def test_kernel_age_is_this_process_age():
    psutil = pytest.importorskip("psutil")
    assert kaggle.kernel_age() == pytest.approx(time.time() - psutil.Process().create_time(), abs=2.0)


def test_run_args_skip_bad_tasks_and_let_extra_flags_override():
    args = kaggle.run_args(Path("c.json"), Path("out.json"), Path("m"), 1234.7, Path("s.json"), Path("p.json"),
                           ["--steps", "8"])
    assert args == ["--challenges", "c.json", "--out", "out.json", "--model", "m", "--budget", "1234s", "--skip-bad",
                    "--solutions", "s.json", "--profile", "p.json", "--steps", "8"]


def test_a_failed_run_still_leaves_a_valid_submission(layout, capsys, monkeypatch):
    found = kaggle.find_inputs()
    out = kaggle.submission_path()
    assert out == layout / "working" / "submission.json"
    assert kaggle.run_kit(["--no-such-flag"]) == 2  # reported, not raised
    with pytest.raises(RuntimeError, match="the run failed"):  # interactive: seen before submitting
        kaggle.finish(found.test_challenges, out, status=2)
    assert load_submission(out, {"t1": 2})["t1"][0]["attempt_1"] == [[3, 3]]  # the baseline was written
    out.write_text("{}")
    monkeypatch.setenv(kaggle.RERUN_VARIABLE, "1")  # the scoring rerun never raises
    assert list(kaggle.finish(found.test_challenges, out, status=1)) == ["t1"]
    assert "writing the no-model baseline" in capsys.readouterr().out


def test_evaluation_run_is_skipped_in_the_rerun_or_without_files_or_budget(layout, monkeypatch):
    found = kaggle.find_inputs()
    assert kaggle.evaluate(found, Path("m"), "5m") is None  # no evaluation files attached
    for name in (kaggle.EVAL_CHALLENGES, kaggle.EVAL_SOLUTIONS):
        (found.competition / name).write_text("{}")
    assert kaggle.evaluate(found, Path("m"), None) is None
    monkeypatch.setenv(kaggle.RERUN_VARIABLE, "1")
    assert kaggle.evaluate(found, Path("m"), "5m") is None


def test_offline_commands_are_exact_and_offline(tmp_path):
    get = offline.download_command(tmp_path, "3.12")
    assert get[get.index("--python-version") + 1] == "3.12"
    assert {"--no-deps", "--only-binary=:all:"} <= set(get)
    tags = {get[i + 1] for i, arg in enumerate(get) if arg == "--platform"}
    assert {"manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= tags
    put = offline.install_command([tmp_path / "a", tmp_path / "b"])
    assert {"--no-index", "--no-deps"} <= set(put)
    assert [put[i + 1] for i, arg in enumerate(put) if arg == "--find-links"] == [str(tmp_path / "a"),
                                                                                 str(tmp_path / "b")]
    assert offline.install([], log=lambda _: None) == []  # no wheels attached: pip is not run


def test_offline_pins_match_the_tested_stack_and_leave_kaggles_torch_alone():
    wheels, tested = offline.pins(), offline.pins(ROOT / "requirements.txt")
    assert {name: wheels[name] for name in wheels.keys() & tested.keys()} == {
        name: tested[name] for name in wheels.keys() & tested.keys()}
    assert {"unsloth", "unsloth-zoo", "transformers", "peft"} <= wheels.keys()
    assert not {"torch", "torchvision", "triton", "numpy", "protobuf", "packaging"} & wheels.keys()

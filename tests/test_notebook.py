"""notebook.ipynb executed headless, as Kaggle runs it, on a CPU: a fake /kaggle in a temp dir (the competition's
files holding two real ARC-AGI-1 evaluation tasks, a copy of the kit, a tiny packed model as an attached dataset, no
wheels: this machine has the stack already, so the install cell installs nothing), a real Jupyter kernel, tiny
budgets. An interactive run: the plan, the run on the test file, the submission check, the scored evaluation run.
The notebook's cells are glue around the CLI, whose tests run the real default model: a tiny model keeps this
test to its subject, the Kaggle layout and the notebook's flow."""
import json
import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

from kit import kaggle
from kit.submission import load_submission

pytestmark = pytest.mark.slow  # the notebook in a real kernel, its runs in subprocesses

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["66e6c45b", "00576224"]  # small grids: a few seconds each on a CPU
SETTINGS = 'INTERACTIVE_BUDGET = "60s"\nEVAL_BUDGET = "45s"\nEXTRA_ARGS = ["--steps", "8", "--augs", "4"]'


def fake_kaggle(root: Path, tasks, model: Path) -> None:
    competition = root / "input" / "competitions" / "arc-prize-2025"
    competition.mkdir(parents=True)
    challenges = {t.id: {"train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in t.train],
                         "test": [{"input": g.tolist()} for g in t.test_inputs]} for t in tasks}
    for name in (kaggle.TEST_CHALLENGES, kaggle.EVAL_CHALLENGES):  # in interactive runs the test file is a copy
        (competition / name).write_text(json.dumps(challenges))
    (competition / kaggle.EVAL_SOLUTIONS).write_text(json.dumps({t.id: [g.tolist() for g in t.test_outputs]
                                                                 for t in tasks}))
    kit = root / "input" / "arc-kit"
    shutil.copytree(ROOT / "kit", kit / "kit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("build_submission.py", "requirements-offline.txt"):
        shutil.copy(ROOT / name, kit / name)
    (root / "input" / "datasets" / "me").mkdir(parents=True)
    (root / "input" / "datasets" / "me" / "tiny").symlink_to(model)
    (root / "working").mkdir()


def test_notebook_writes_a_valid_submission_and_scores_the_evaluation_set(tmp_path, monkeypatch, arc1_eval,
                                                                           tiny_model_dir):
    tasks = arc1_eval.select(TASKS).tasks
    root = tmp_path / "kaggle"
    fake_kaggle(root, tasks, tiny_model_dir)
    monkeypatch.setenv(kaggle.ROOT_VARIABLE, str(root))  # the kernel inherits this environment
    monkeypatch.delenv(kaggle.RERUN_VARIABLE, raising=False)
    nb = nbformat.read(ROOT / "notebook.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(SETTINGS))  # papermill's way: overrides after the defaults

    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(root / "working")}}).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"kit: {root / 'input' / 'arc-kit'}" in text
    assert "no wheels folder attached" in text
    assert f"model: {root / 'input' / 'datasets' / 'me' / 'tiny'}" in text
    assert "the plan of a scoring rerun" in text and "interactive run: budget 1m00s" in text
    counts = {t.id: len(t.test_inputs) for t in tasks}
    submission = load_submission(root / "working" / "submission.json", counts)
    assert list(submission) == TASKS
    assert f"{root / 'working' / 'submission.json'}: valid, 2 tasks" in text
    load_submission(root / "working" / "eval" / "submission.json", counts)
    assert "score " in text.split("--solutions", 1)[1]  # the evaluation run scored itself

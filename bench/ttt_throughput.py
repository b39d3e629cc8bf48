"""TTT training and inference throughput of the kit against naive baselines, measured in one run on the same
tasks with SmolLM2-135M (the embedded default).

Training: the kit's step (`kit.ttt.train_step`: bucketed batches, loss on output tokens only, LM head
restricted to the grid vocabulary, bf16 autocast where the CPU has it, fused AdamW, gradient clipping, and the
training pass compiled as `--compile auto` does on a CPU; the compilation is timed and printed, not counted
in tokens/s) against a naive loop (fp32, full vocabulary over every position via HF's `labels=` loss, random
batches padded to the longest, HF's per-tensor AdamW). Both train the same LoRA on the same leave-one-out
sequences; tokens/s counts real (non-pad) tokens. Target: >= 2.5x.

Inference: grids decoded per second by the kit (all views of a test input prefilled in one right-padded pass,
then decoded in one batch on the KV cache, grid vocabulary, LoRA merged into the weights, views given up on
once they cannot parse as a grid) against HF `generate` one view at a time (fp32, full vocabulary).
Target: >= 3x. Also the product-of-experts scoring of the decoded candidates under every view: the kit's
(each prompt once, the answers after it) against one full forward per (candidate, view) pair.

    python bench/ttt_throughput.py [--tasks N] [--skip N] [--steps N] [--backend peft|unsloth]
                                   [--compile auto|on|off] [--checkpointing] [--model DIR] [--challenges FILE]
                                   [--train-only]

(`--skip 100 --tasks 3` measures mid-size tasks, ~850 tokens, where the kit trains with the flash kernel.)
Each training loop also reports its seconds per step and peak memory above what was held before it (GPU memory
on CUDA; on a CPU the resident set, which memory the allocator keeps blurs), for comparing the backends on a GPU
(docs/results.md).
The kit trains without gradient checkpointing, as a worker does wherever its memory plan fits the batch without
(`--checkpointing` times the plan's fallback); `--compile` is the kit's flag (auto: compiled on a CPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.augment import task_rng  # noqa: E402
from kit.backend import load_backend  # noqa: E402
from kit.config import InferSettings, LoraSettings, RunConfig  # noqa: E402
from kit.decode import generate  # noqa: E402
from kit.format import GridFormat, GridWatch, answer_budget, task_tokens  # noqa: E402
from kit.infer import inference_views, inverted_grids, score_under_views, view_prompts  # noqa: E402
from kit.memory.measure import PeakMemory  # noqa: E402
from kit.shapes import plausible_side  # noqa: E402
from kit.tasks import load_bundled, load_challenges  # noqa: E402
from kit.ttt import adamw, bucketed_batches, collate, train_step, training_sequences  # noqa: E402
from kit.vote import tally  # noqa: E402
from kit.weights import ensure_default_model  # noqa: E402

BATCH, MAX_LENGTH, VIEWS = 4, 2048, 8


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(step, batches, device: torch.device) -> tuple[float, float, int]:
    """Run `step` over the batches (after one warm-up step); returns real tokens per second, seconds per step and
    the peak memory in bytes above what was held before (warm-up included: the optimiser's state is made there)."""
    with PeakMemory(device.type) as peak:
        step(batches[0])
        synchronize(device)
        tokens, start = 0, time.perf_counter()
        for batch in batches[1:]:
            tokens += step(batch)
        synchronize(device)
        seconds = time.perf_counter() - start
    return tokens / seconds, seconds / (len(batches) - 1), peak.added


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--tasks", type=int, default=5, help="the N smallest ARC-1 eval tasks by token count")
    args.add_argument("--skip", type=int, default=0, help="after skipping the N smallest")
    args.add_argument("--steps", type=int, default=6, help="timed training steps per task and loop")
    args.add_argument("--backend", default="peft", choices=("peft", "unsloth"))
    args.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                      help="compile the kit's training pass (auto: as the kit decides, on a CPU)")
    args.add_argument("--checkpointing", action="store_true", help="the kit trains with gradient checkpointing")
    args.add_argument("--model", type=Path, help="model directory (default: the embedded default)")
    args.add_argument("--challenges", type=Path, help="a challenges file instead of the bundled ARC-1 eval set")
    args.add_argument("--train-only", action="store_true", help="time training only (no decoding or scoring)")
    opts = args.parse_args()

    model_dir = opts.model or ensure_default_model()
    pool = load_challenges(opts.challenges) if opts.challenges else load_bundled("arc1-eval")
    tasks = sorted(pool.tasks, key=task_tokens)[opts.skip:opts.skip + opts.tasks]
    kit = load_backend(model_dir, opts.backend, LoraSettings(), MAX_LENGTH)
    device = kit.device
    fmt = GridFormat.from_tokenizer(kit.tokenizer)
    vocab = torch.tensor(fmt.grid_vocabulary)
    naive_model = load_naive(model_dir).to(device)
    params = [p for p in naive_model.parameters() if p.requires_grad]
    naive_opt = torch.optim.AdamW(params, lr=1e-4)
    kit_opt = adamw(kit.trainable_parameters(), 1e-4)
    kit_schedule = torch.optim.lr_scheduler.LambdaLR(kit_opt, lambda step: 1.0)
    kit_scaler = kit.loss_scaler()
    kit.set_checkpointing(opts.checkpointing)
    compile_s = kit.compile_training() if RunConfig(compile=opts.compile).compiles(device.type) else 0.0

    def kit_step(batch) -> int:
        kit.train()
        return train_step(kit, batch, fmt.eos_id, vocab, kit_opt, kit_schedule, kit_scaler).tokens

    def naive_step(batch) -> int:
        ids, labels, mask = (t.to(device) for t in collate(batch, fmt.eos_id))
        naive_model.train()
        naive_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        naive_opt.step()
        naive_opt.zero_grad()
        return int(mask.sum())

    kit_rates, naive_rates, kit_grids, naive_grids, kit_pairs, naive_pairs = [], [], [], [], [], []
    kit_steps, naive_steps, kit_peaks, naive_peaks = [], [], [], []
    for task in tasks:
        rng = task_rng(0, task.id, "bench")
        sequences = training_sequences(fmt, task, (opts.steps + 1) * BATCH, MAX_LENGTH, rng)
        bucketed = bucketed_batches(sequences, BATCH, rng)
        shuffled = [[sequences[i] for i in chunk] for chunk in np.array_split(rng.permutation(len(sequences)),
                                                                            len(sequences) // BATCH)]
        for loop, batches, rates, steps, peaks in ((kit_step, bucketed, kit_rates, kit_steps, kit_peaks),
                                                   (naive_step, shuffled, naive_rates, naive_steps, naive_peaks)):
            rate, step_seconds, peak = train_rate(loop, batches, device)
            rates.append(rate)
            steps.append(step_seconds)
            peaks.append(peak)
        print(f"{task.id} ({task_tokens(task)} tokens): train {kit_rates[-1]:.0f} vs {naive_rates[-1]:.0f} tok/s, "
              f"{kit_steps[-1] * 1e3:.0f} vs {naive_steps[-1] * 1e3:.0f} ms/step, "
              f"peak +{kit_peaks[-1] / 2**20:.0f} vs +{naive_peaks[-1] / 2**20:.0f} MiB", flush=True)
        if opts.train_only:
            continue

        test_input = task.test_inputs[0]
        side = plausible_side(task, test_input)
        budget = answer_budget(side)
        views, prompts = view_prompts(fmt, task, test_input, inference_views(rng, VIEWS, len(task.train)), budget,
                                      MAX_LENGTH)
        start = time.perf_counter()
        with kit.merged_adapter():  # as kit.infer decodes: on merged weights (the merge is timed too)
            outputs = generate(kit, prompts, fmt.grid_vocabulary, fmt.eos_id, budget, None,
                               GridWatch(fmt, len(prompts), side).step)
        kit_grids.append(len(prompts) / (time.perf_counter() - start))
        start = time.perf_counter()
        naive_model.eval()
        with torch.no_grad():
            for prompt in prompts:
                naive_model.generate(torch.from_numpy(prompt)[None].to(device), max_new_tokens=budget, do_sample=False,
                                     eos_token_id=fmt.eos_id, pad_token_id=fmt.eos_id)
        naive_grids.append(len(prompts) / (time.perf_counter() - start))

        candidates = tally(inverted_grids(fmt, views, outputs))
        pairs = len(candidates) * len(views)
        start = time.perf_counter()
        with kit.merged_adapter():
            score_under_views(kit, fmt, candidates, views, prompts, InferSettings())
        kit_pairs.append(pairs / (time.perf_counter() - start))
        start = time.perf_counter()
        with torch.no_grad():
            for candidate in candidates:
                for view, prompt in zip(views, prompts):
                    naive_score(naive_model, prompt, fmt.encode_answer(view.grid(candidate.grid)))
        naive_pairs.append(pairs / (time.perf_counter() - start))
        print(f"{task.id}: decode {kit_grids[-1]:.2f} vs {naive_grids[-1]:.2f} grids/s, "
              f"score {kit_pairs[-1]:.1f} vs {naive_pairs[-1]:.1f} pairs/s ({len(candidates)} candidates)", flush=True)

    train_ratio = np.mean(kit_rates) / np.mean(naive_rates)
    print(f"backend {kit.name} on {kit.device}, {len(tasks)} tasks, torch threads {torch.get_num_threads()}, "
          f"checkpointing {'on' if opts.checkpointing else 'off'}, "
          + (f"training pass compiled in {compile_s:.1f} s (once per worker)" if kit.compiled else "not compiled"))
    print(f"TTT training: kit {np.mean(kit_rates):.0f} tok/s vs naive {np.mean(naive_rates):.0f} tok/s: "
          f"ratio {train_ratio:.2f}x (target >= 2.5x); {np.mean(kit_steps) * 1e3:.0f} vs "
          f"{np.mean(naive_steps) * 1e3:.0f} ms/step; peak memory above the loaded models "
          f"+{max(kit_peaks) / 2**20:.0f} vs +{max(naive_peaks) / 2**20:.0f} MiB")
    if opts.train_only:
        return
    decode_ratio = np.mean(kit_grids) / np.mean(naive_grids)
    print(f"inference: kit {np.mean(kit_grids):.2f} grids/s vs naive {np.mean(naive_grids):.2f} grids/s: "
          f"ratio {decode_ratio:.2f}x (target >= 3x)")
    print(f"scoring (product of experts): kit {np.mean(kit_pairs):.1f} vs naive {np.mean(naive_pairs):.1f} "
          f"(candidate, view) pairs/s: ratio {np.mean(kit_pairs) / np.mean(naive_pairs):.2f}x")


def naive_score(model, prompt: np.ndarray, answer: np.ndarray) -> float:
    """log p(answer | prompt) from one full forward of prompt + answer (full vocabulary, fp32)."""
    ids = torch.from_numpy(np.concatenate([prompt, answer]))[None].to(model.device)
    log_probs = model(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    return float(log_probs.gather(1, ids[0, len(prompt):, None]).sum())


def load_naive(model_dir: Path):
    """HF defaults: fp32 weights, full vocabulary, the same LoRA shape as the kit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LoraSettings().peft_config()))


if __name__ == "__main__":
    main()

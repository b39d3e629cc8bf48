"""The model behind one small interface: LoRA reset, training loss, greedy decoding, answer likelihoods.

Two implementations share all the maths: `UnslothBackend` (FastLanguageModel; on a CPU-only host unsloth
itself falls back to stock transformers + PEFT) and `PeftBackend` (transformers + PEFT). They differ only in
how the model is loaded and how train/eval modes are switched.

Speed rules used throughout: the decoder runs once per batch, a prompt once however many answers are scored
after it (`prefill`, then `score` on its cached keys and values), and the LM head is applied only where a
log-probability is needed (labelled positions, the last position while decoding), restricted to the
allowed vocabulary when one is given. The head itself runs in fp32 so that losses and scores do not carry
bf16 rounding of the logits. Under bf16 autocast, PEFT's cast of each LoRA input to fp32 is switched off
(autocast casts it straight back). `compile_training` compiles each decoder layer once for the training
pass (regional compilation: one graph serves all layers, all batch sizes from 2 and all lengths); scoring
and decoding always run eagerly, since the KV cache would recompile a graph per step. On a CPU the attention
kernel follows the length (`attention_for`). transformers, peft and unsloth are imported lazily (unsloth patches
transformers on import and must come first).
"""
from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kit import attention
from kit.config import LoraSettings  # torch-free, so the CLI builds it without torch
from kit.format import IGNORE
from kit.weights import offline_environment

__all__ = ["Backend", "LoraSettings", "PeftBackend", "UnslothBackend", "load_backend", "offline_environment"]

Ids = Sequence[int] | torch.Tensor  # token ids: a list, or a 1-D LongTensor


@dataclass
class Prefix:
    """Prompts run once (`Backend.prefill`), one row each, right-padded: each layer's keys and values, the last
    real position's hidden state (it predicts an answer's first token), the lengths and the padding mask."""
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    last_hidden: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    legacy: bool = False  # the decoder returned (keys, values) tuples (unsloth's fast forward) and takes them back


# On a CPU, eager attention is the faster kernel for short passes and torch's flash kernel (sdpa, causal, no mask)
# for long ones, where eager's batch x heads x length^2 fp32 scores swamp the memory traffic: SmolLM2-135M training
# steps of 4 x 316 tokens took 2.9 s eager vs 3.3 s sdpa, 4 x 454 about even, 4 x 710 13-17 s eager vs 8-9 s sdpa.
CPU_SDPA_FROM = 512  # tokens


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere torch emulates them, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def default_dtype(device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 where the hardware has it (CUDA from Ampere on, AVX512-BF16/AMX CPUs), else fp32."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32


class Backend:
    """A causal LM with one LoRA adapter attached at load time and re-initialised per task."""

    name = "base"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                 max_length: int, seed: int) -> None:
        from peft.tuners.lora import LoraLayer

        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self._base = base = model.get_base_model()
        self.max_length = min(max_length, getattr(base.config, "max_position_embeddings", max_length))
        cpu = device.type == "cpu"
        self._loaded_attention = base.config._attn_implementation
        # Decoding steps and scoring's answer passes (a padding mask, so no flash kernel on a CPU) run eager attention
        # reading the grouped KV cache in place (kit.attention) where it reproduces the model's own eager attention.
        # Prefills are right-padded passes like training's, with the kernel `attention_for` their length.
        if cpu:
            self.decode_attention = attention.register() if attention.reproduces(base) else "eager"
        else:
            self.decode_attention = self._loaded_attention
        # None: the loaded kernel at every length (GPUs, and models without sdpa)
        self.sdpa_from = CPU_SDPA_FROM if cpu and getattr(base, "_supports_sdpa", False) else None
        self._set_attention(self.decode_attention)
        self._decoder = base.get_decoder()
        self._head = base.get_output_embeddings().weight
        self._pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self._lora_layers = [m for _, m in model.named_modules() if isinstance(m, LoraLayer)]
        self._lora = [m[name].weight for layer in self._lora_layers for name in layer.active_adapters
                      for m in (layer.lora_A, layer.lora_B)]
        if not self._lora:
            raise ValueError(f"{type(model).__name__}: no LoRA layers were attached")
        lora_ids = {id(p) for p in self._lora}
        for p in model.parameters():
            p.requires_grad_(id(p) in lora_ids)
        if dtype == torch.bfloat16:  # autocast computes LoRA in bf16: PEFT's fp32 input cast is a wasted copy
            for layer in self._lora_layers:
                layer.cast_input_dtype_enabled = False
        self.compiled = False  # training runs through compiled decoder layers (`compile_training`)
        self.reset_lora(seed)
        self.eval()

    # --- adapter -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_lora(self, seed: int) -> None:
        """A fresh adapter in place: A ~ kaiming-uniform (as PEFT) from `seed` alone, B = 0, no grads left."""
        generator = torch.Generator().manual_seed(seed)
        for layer in self._lora_layers:
            for name in layer.active_adapters:
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                fresh = torch.empty(a.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                a.copy_(fresh)
                b.zero_()
        for p in self._lora:
            p.grad = None

    @contextmanager
    def merged_adapter(self) -> Iterator[None]:
        """Inference through merged weights W + s*B*A instead of W plus the LoRA branch: one matmul per
        projection instead of three, a third of the kernels per decoding step. The merged weights are new
        tensors swapped in (an untrained adapter, B = 0, swaps nothing); the base's own tensors are put back
        on exit, untouched (merging in place and subtracting afterwards would drift in bf16)."""
        swapped = []
        try:
            with torch.no_grad():
                for layer in self._lora_layers:
                    names = [n for n in layer.active_adapters if bool(layer.lora_B[n].weight.any())]
                    if names:
                        base = layer.get_base_layer()
                        delta = sum(layer.get_delta_weight(n).float() for n in names)
                        swapped.append((base, base.weight))
                        base.weight = torch.nn.Parameter((base.weight.float() + delta).to(base.weight.dtype),
                                                         requires_grad=False)
            with self.model.disable_adapter():
                yield
        finally:
            for base, weight in swapped:
                base.weight = weight

    def merged_weight_bytes(self) -> int:
        """What `merged_adapter` adds at most: a copy of every adapted weight (for the memory plan)."""
        return sum(layer.get_base_layer().weight.nbytes for layer in self._lora_layers)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._lora)

    def set_checkpointing(self, on: bool) -> None:
        """Gradient checkpointing of the decoder layers: recompute activations in the backward pass instead of
        keeping them (the memory plan turns it on when a task's batch would not fit otherwise)."""
        if on == bool(getattr(self._base, "is_gradient_checkpointing", False)):
            return
        if on:
            self._base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self._base.gradient_checkpointing_disable()

    def compile_training(self) -> float:
        """Compile the decoder layers for training (torch.compile, dynamic shapes) and pay the compilation now,
        with one step on made-up 2-row batches per attention kernel, rather than inside a task's deadline;
        returns its seconds. One-row batches and grad-free passes stay eager (each would cost another
        compilation). Raises what the compiler raised (no C++ compiler, say), leaving the backend eager."""
        start = time.perf_counter()
        try:
            for layer in self._decoder.layers:
                layer.compile(dynamic=True)
            self.compiled = True
            self.train()
            for length in self._warmup_lengths():
                ids = (torch.arange(2 * length) % self._head.shape[0]).reshape(2, length)
                labels = ids.clone()
                labels[:, : length // 2] = IGNORE
                self.loss(ids, labels, torch.ones_like(ids)).backward()
        except Exception:
            self.compiled = False
            raise
        finally:
            for p in self._lora:
                p.grad = None
            self.eval()
        return time.perf_counter() - start

    def _warmup_lengths(self) -> list[int]:
        """One length per attention kernel a training pass may use. Odd, so that no model dimension equals it:
        a size shared with a weight would be traced as the same symbol, tying the graph to that length."""
        short = 41 if self.sdpa_from is None else max(3, min(41, self.sdpa_from - 1))
        lengths = [short - (short % 2 == 0)] + ([self.sdpa_from | 1] if self.sdpa_from else [])
        return [n for n in lengths if n <= self.max_length]

    def attention_for(self, length: int) -> str:
        """The attention kernel of a right-padded pass without cache (training, prompt prefills) over `length`
        tokens (CPU_SDPA_FROM)."""
        if self.sdpa_from is None:
            return self._loaded_attention
        return "sdpa" if length >= self.sdpa_from else "eager"

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    # --- likelihoods -------------------------------------------------------------------------------------

    def loss(self, input_ids: torch.LongTensor, labels: torch.LongTensor, attention_mask: torch.Tensor,
             vocab: Ids | None = None) -> torch.Tensor:
        """Mean cross-entropy over the tokens whose label is not IGNORE (labels aligned with input_ids).

        Batches must be right-padded (pads after the tokens): the decoder then runs with a plain causal
        mask, which is exact for every real token and the only layout unsloth's training path supports.
        With `vocab`, the softmax is over those ids only and every label must be one of them.
        """
        log_probs, _ = self._label_log_probs(input_ids, labels, attention_mask, vocab)
        if log_probs.numel() == 0:
            raise ValueError("loss over a batch without any labelled token")
        return -log_probs.mean()

    @torch.no_grad()
    def prefill(self, prompts: Sequence[np.ndarray]) -> Prefix:
        """Run prompts once, in one right-padded pass, and keep their keys and values, so that `score` can score
        any number of answers after any of them without recomputing it (the product of experts scores every
        candidate under every view's prompt). Switches to eval mode."""
        self.eval()
        ids, mask = self._pad(prompts)
        self._check_length(ids.shape[1])
        self._set_attention(self.attention_for(ids.shape[1]))
        with self._autocast(), self._compiled_if(False):  # right padding: causality keeps pads out of real rows
            out = self._decoder(input_ids=ids, use_cache=True)
        lengths = mask.sum(1)
        last_hidden = out.last_hidden_state[torch.arange(len(prompts), device=self.device), lengths - 1]
        cache = out.past_key_values
        return Prefix(layer_keys_values(cache), last_hidden, lengths, mask, legacy=not hasattr(cache, "layers"))

    @torch.no_grad()
    def score(self, prefix: Prefix, prompt_rows: Sequence[int], answers: Sequence[np.ndarray],
              vocab: Ids | None = None) -> np.ndarray:
        """Summed log-probability of each answer after the prefix's prompt in `prompt_rows` (float64): one
        right-padded pass over the answers alone, attending to their prompts' cached keys and values (a mask hides
        the prompts' padding). Switches to eval mode."""
        if len(prompt_rows) != len(answers):
            raise ValueError(f"{len(prompt_rows)} prompt rows but {len(answers)} answers")
        self.eval()
        answer_ids, answer_mask = self._pad(answers)
        rows = torch.as_tensor(prompt_rows, dtype=torch.long, device=self.device)
        lengths = prefix.lengths[rows]
        self._check_length(int((lengths + answer_mask.sum(1)).max()))
        cache = cache_rows(prefix.keys_values, rows, prefix.legacy)
        positions = lengths[:, None] + torch.arange(answer_ids.shape[1], device=self.device)
        self._set_attention(self.decode_attention)
        with self._autocast(), self._compiled_if(False):
            hidden = self._decoder(input_ids=answer_ids, attention_mask=torch.cat([prefix.mask[rows], answer_mask], 1),
                                   position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        # answer token j is predicted by the hidden state before it: for j = 0, its prompt's last
        before = torch.cat([prefix.last_hidden[rows, None].to(hidden.dtype), hidden[:, :-1]], 1)
        keep = answer_mask.bool()
        log_probs = self._log_probs(before[keep], answer_ids[keep], vocab)
        totals = torch.zeros(len(answers), dtype=torch.float64, device=self.device)
        return totals.index_add_(0, keep.nonzero()[:, 0], log_probs.double()).cpu().numpy()

    def _label_log_probs(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                         vocab: Ids | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every labelled token and the row it belongs to."""
        input_ids, labels, attention_mask = (t.to(self.device) for t in (input_ids, labels, attention_mask))
        self._check_length(input_ids.shape[1])
        if not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            raise ValueError("the loss needs right-padded batches (attention_mask must be 1s then 0s per row)")
        targets = labels.masked_fill(attention_mask == 0, IGNORE)[:, 1:]  # token t predicts label t+1
        keep = targets != IGNORE
        self._set_attention(self.attention_for(input_ids.shape[1]))
        with self._autocast(), self._compiled_if(torch.is_grad_enabled() and input_ids.shape[0] > 1):
            hidden = self._decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        return self._log_probs(hidden[:, :-1][keep], targets[keep], vocab), keep.nonzero()[:, 0]

    def _log_probs(self, hidden: torch.Tensor, wanted: torch.Tensor, vocab: Ids | None) -> torch.Tensor:
        """log p(wanted token | the hidden state before it), over `vocab` only when given (shared by loss and
        score)."""
        if vocab is None:
            logits = self._logits(hidden, self._head)
        else:
            allowed = self._ids(vocab)
            logits, wanted = self._logits(hidden, self._head[allowed]), index_in(wanted, allowed)
        return -F.cross_entropy(logits, wanted, reduction="none")

    # --- decoding ----------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[np.ndarray], vocab: Ids, eos_id: int, max_new_tokens: int,
                 deadline: float | None = None, give_up: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> list[np.ndarray]:
        """Greedy continuation of each prompt over `vocab` only (`prefill`, then `decode`)."""
        return self.decode(self.prefill(prompts), vocab, eos_id, max_new_tokens, deadline, give_up)

    @torch.no_grad()
    def decode(self, prefix: Prefix, vocab: Ids, eos_id: int, max_new_tokens: int, deadline: float | None = None,
               give_up: Callable[[np.ndarray], np.ndarray] | None = None) -> list[np.ndarray]:
        """Greedy continuation of each prefilled prompt over `vocab` only, one token per row and step on the KV
        cache (the prefix stays intact, for `score`).

        Each row ends at its first `eos_id` (kept in its output) or after `max_new_tokens`, also limited
        so that no sequence exceeds `max_length`, or when `deadline` (time.monotonic()) passes, or where
        `give_up` (called with each step's token of every row) flags it: rows cut off by the deadline or given
        up on have no EOS. Finished rows leave the batch. Switches to eval mode.
        """
        allowed = self._ids(vocab)
        if not bool((allowed == eos_id).any()):
            raise ValueError(f"eos_id {eos_id} is not in the decoding vocabulary")
        self.eval()
        count = len(prefix.lengths)
        budget = min(max_new_tokens, self.max_length - prefix.mask.shape[1])
        head = self._head[allowed]
        rows = torch.arange(count, device=self.device)  # the prompt of each row still being decoded
        tokens = torch.full((count, budget), eos_id, dtype=torch.long, device=self.device)
        given_up = np.zeros(count, np.int64)  # tokens kept of a row given up on, 0 for the others
        mask, positions, hidden = prefix.mask, prefix.lengths[:, None], prefix.last_hidden
        cache, taken = cache_rows(prefix.keys_values, legacy=prefix.legacy), 0
        self._set_attention(self.decode_attention)
        with self._autocast(), self._compiled_if(False):
            for step in range(budget):
                chosen = allowed[self._logits(hidden, head).argmax(-1)]
                tokens[rows, step] = chosen
                taken = step + 1
                done = chosen == eos_id
                if give_up is not None:
                    hopeless = torch.from_numpy(give_up(tokens[:, step].cpu().numpy())).to(self.device)[rows]
                    given_up[rows[hopeless & ~done].cpu().numpy()] = taken
                    done |= hopeless
                if bool(done.all()) or step + 1 == budget or (deadline is not None and time.monotonic() >= deadline):
                    break
                if bool(done.any()):  # finished rows leave the batch: the others' steps get cheaper
                    keep = (~done).nonzero()[:, 0]
                    rows, chosen, positions, mask = rows[keep], chosen[keep], positions[keep], mask[keep]
                    cache = cache_rows(layer_keys_values(cache), keep, prefix.legacy)
                mask = F.pad(mask, (0, 1), value=1)
                out = self._decoder(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=True)
                cache, hidden, positions = out.past_key_values, out.last_hidden_state[:, -1], positions + 1
        generated = tokens[:, :taken].cpu().numpy()
        return [row[:kept] if kept else until_first(row, eos_id) for row, kept in zip(generated, given_up)]

    # --- helpers -----------------------------------------------------------------------------------------

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def _set_attention(self, kernel: str) -> None:
        if self._base.config._attn_implementation != kernel:
            self._base.set_attn_implementation(kernel)

    def _compiled_if(self, wanted: bool) -> AbstractContextManager:
        """Compiled layers where `wanted` (and compiled), else eager: a graph-free stance, not a recompilation."""
        return nullcontext() if self.compiled and wanted else torch.compiler.set_stance("force_eager")

    def _logits(self, hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """LM head in fp32, outside autocast: exact enough to compare likelihoods across candidates."""
        with torch.autocast(self.device.type, enabled=False):
            return hidden.float() @ head.float().T

    def _ids(self, ids: Ids) -> torch.Tensor:
        return torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)

    def _check_length(self, length: int) -> int:
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens exceeds max_length {self.max_length}")
        return length

    def _pad(self, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of different lengths as one right-padded (ids, mask) batch on the device."""
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("need at least one sequence, and no empty one")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)


class PeftBackend(Backend):
    name = "peft"

    @classmethod
    def load(cls, model_dir: Path, lora: LoraSettings, max_length: int, seed: int, device: torch.device,
             dtype: torch.dtype) -> PeftBackend:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Frozen weights in the compute dtype, so autocast never re-casts them (the saved model is bf16 already);
        # PEFT keeps the adapter weights in fp32.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        if device.type == "cuda":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora.peft_config()))
        return cls(model, AutoTokenizer.from_pretrained(model_dir), device, dtype, max_length, seed)


class UnslothBackend(Backend):
    name = "unsloth"

    @classmethod
    def load(cls, model_dir: Path, lora: LoraSettings, max_length: int, seed: int, device: torch.device,
             dtype: torch.dtype) -> UnslothBackend:
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            str(model_dir), max_seq_length=max_length, load_in_4bit=False, dtype=dtype)
        cuda = device.type == "cuda"
        model = FastLanguageModel.get_peft_model(
            model, **lora.peft_config(), random_state=seed, use_gradient_checkpointing="unsloth" if cuda else False)
        backend = cls(model, tokenizer, device, dtype, max_length, seed)
        backend._cuda_checkpointing = "unsloth" if cuda else None
        return backend

    # On CUDA: unsloth's checkpointing (activations offloaded to host memory), armed at load and switched per
    # training pass by `train`; on until the memory plan finds it unneeded (as PeftBackend). None: not on CUDA.
    _cuda_checkpointing: str | bool | None = None

    def set_checkpointing(self, on: bool) -> None:
        """On CUDA unsloth's own (offloading) checkpointing, applied by the next `train`; elsewhere as the base
        class."""
        if self._cuda_checkpointing is None:
            super().set_checkpointing(on)
        else:
            self._cuda_checkpointing = "unsloth" if on else False

    def train(self) -> None:
        from unsloth import FastLanguageModel
        FastLanguageModel.for_training(self.model, use_gradient_checkpointing=self._cuda_checkpointing)

    def eval(self) -> None:
        from unsloth import FastLanguageModel
        FastLanguageModel.for_inference(self.model)


BACKENDS: dict[str, type[Backend]] = {"unsloth": UnslothBackend, "peft": PeftBackend}


def load_backend(model_dir: str | Path, kind: str = "auto", lora: LoraSettings | None = None,
                 max_length: int = 8192, seed: int = 0, log: Callable[[str], None] = print,
                 dtype: torch.dtype | None = None) -> Backend:
    """Load the model once, attach the LoRA once. `kind` "auto" prefers unsloth when it imports.
    `lora` None means the default LoraSettings; `dtype` None picks the compute dtype for the device."""
    offline_environment()
    start = time.perf_counter()
    if kind == "auto":
        kind = "unsloth" if unsloth_importable(log) else "peft"
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose from auto, {', '.join(BACKENDS)}")
    device = pick_device()
    dtype = dtype or default_dtype(device)
    backend = BACKENDS[kind].load(Path(model_dir), lora or LoraSettings(), max_length, seed, device, dtype)
    log(f"backend {backend.name} on {device} ({str(dtype).removeprefix('torch.')} compute), "
        f"{model_dir} loaded in {time.perf_counter() - start:.1f} s (imports included)")
    return backend


def unsloth_importable(log: Callable[[str], None]) -> bool:
    try:
        importlib.import_module("unsloth")
        return True
    except Exception as error:  # noqa: BLE001 -- unsloth raises plain errors on unsupported hosts
        log(f"unsloth unavailable ({type(error).__name__}: {error}); falling back to transformers+peft")
        return False


def layer_keys_values(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) from a transformers Cache, or from the tuples unsloth's fast forward returns."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(keys, values) for keys, values, *_ in cache]


def cache_rows(keys_values: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor | None = None,
               legacy: bool = False) -> Any:
    """A cache holding those rows (None: all) of each layer's keys and values, as copies: the given tensors stay
    intact. A transformers DynamicCache, or with `legacy` the per-layer (keys, values) tuples that unsloth's fast
    forward returns and indexes."""
    from transformers import DynamicCache

    picked = [(k, v) if rows is None else (k[rows], v[rows]) for k, v in keys_values]
    if legacy:
        return tuple((k.clone(), v.clone()) if rows is None else (k, v) for k, v in picked)
    cache = DynamicCache()
    for index, (keys, values) in enumerate(picked):
        cache.update(keys, values, index)  # concatenated onto an empty tensor: a copy
    return cache


def index_in(ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Position of each id within `allowed` (labels remapped into a restricted vocabulary)."""
    match = ids[:, None] == allowed[None, :]
    if not bool(match.any(1).all()):
        missing = sorted(set(ids[~match.any(1)].tolist()))
        raise ValueError(f"label ids {missing} are not in the restricted vocabulary")
    return match.int().argmax(1)


def until_first(row: np.ndarray, stop: int) -> np.ndarray:
    """The row up to and including the first `stop`, or all of it."""
    hits = np.flatnonzero(row == stop)
    return row[: hits[0] + 1] if len(hits) else row

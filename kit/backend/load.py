"""Loading: the model and its tokenizer from a directory, the LoRA attached once, by one of two implementations
that share all the maths (kit/backend/model.py) and differ only in how the model is loaded and how train/eval
modes are switched: `UnslothBackend` (FastLanguageModel; on a CPU-only host unsloth itself falls back to stock
transformers + PEFT) and `PeftBackend` (transformers + PEFT). Also the device and the compute dtype.
transformers, peft and unsloth are imported lazily (unsloth patches transformers on import and must come first).
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kit.backend import adapter
from kit.backend.model import Backend
from kit.config import LoraSettings, SettingError  # torch-free, so the CLI builds them without torch
from kit.weights import offline_environment


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere torch emulates them, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def default_dtype(device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 where the hardware has it (CUDA from Ampere on, AVX512-BF16/AMX CPUs); fp16 with loss
    scaling on older GPUs (a T4), where fp32 would halve the speed and double the memory; else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


NAMED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`--dtype` (kit.config.DTYPES) as a torch dtype: "auto" or None by the device (`default_dtype`)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in NAMED_DTYPES:
        raise SettingError(f"unknown dtype {name!r}; choose from auto, {', '.join(NAMED_DTYPES)}")
    return NAMED_DTYPES[name]


def check_4bit(device: torch.device) -> None:
    """4-bit bases need bitsandbytes' CUDA kernels: anywhere else, one line saying so, before anything loads."""
    if device.type != "cuda":
        raise SettingError("--load-in-4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels) and this machine has "
                         "none: run without it (bf16 or fp32 weights)")
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise SettingError(f"--load-in-4bit needs bitsandbytes ({error}): pip install bitsandbytes") from None


def lora_config(model: torch.nn.Module, lora: LoraSettings) -> dict:
    """The adapter's settings with its targets resolved in this model (adapter.target_names), and the token rows
    that train with it (peft's trainable tokens, which unsloth's loader refuses before it gets here)."""
    config = {**lora.peft_config(), "target_modules": adapter.target_names(model, lora.target_modules)}
    if lora.trainable_tokens:
        config["trainable_token_indices"] = adapter.token_targets(model, lora.trainable_tokens)
    return config


class PeftBackend(Backend):
    name = "peft"

    @classmethod
    def load(cls, model_dir: Path, lora: LoraSettings, max_length: int, seed: int, device: torch.device,
             dtype: torch.dtype, load_in_4bit: bool = False) -> PeftBackend:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        # Frozen weights in the compute dtype, so autocast never re-casts them (the saved model is bf16 already),
        # or packed in 4 bits (NF4, computing in the compute dtype); PEFT keeps the adapter weights in fp32.
        if load_in_4bit:
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quantization,
                                                         device_map={"": device})
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        if device.type == "cuda":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_config(model, lora)))
        return cls(model, AutoTokenizer.from_pretrained(model_dir), device, dtype, max_length, seed)


class UnslothBackend(Backend):
    name = "unsloth"

    @classmethod
    def load(cls, model_dir: Path, lora: LoraSettings, max_length: int, seed: int, device: torch.device,
             dtype: torch.dtype, load_in_4bit: bool = False) -> UnslothBackend:
        if lora.trainable_tokens:
            raise SettingError("training the embeddings' token rows needs --backend peft: unsloth's get_peft_model "
                               "takes no trainable tokens")
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            str(model_dir), max_seq_length=max_length, load_in_4bit=load_in_4bit, dtype=dtype)
        cuda = device.type == "cuda"
        model = FastLanguageModel.get_peft_model(
            model, **lora_config(model, lora), random_state=seed,
            use_gradient_checkpointing="unsloth" if cuda else False)
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
                 dtype: torch.dtype | str | None = None, load_in_4bit: bool = False) -> Backend:
    """Load the model once, attach the LoRA once. `kind` "auto" prefers unsloth when it imports and can take the
    adapter (not trained token rows, which only peft trains).
    `lora` None means the default LoraSettings; `dtype` None or "auto" picks the compute dtype for the device;
    `load_in_4bit` packs the frozen weights (CUDA only: refused elsewhere before anything loads)."""
    offline_environment()
    start = time.perf_counter()
    device = pick_device()
    dtype = resolve_dtype(dtype, device)
    if load_in_4bit:
        check_4bit(device)
    lora = lora or LoraSettings()
    if kind == "auto":
        kind = "unsloth" if not lora.trainable_tokens and unsloth_importable(log) else "peft"
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose from auto, {', '.join(BACKENDS)}")
    backend = BACKENDS[kind].load(Path(model_dir), lora, max_length, seed, device, dtype,
                                  load_in_4bit)
    backend.check_head(str(model_dir))
    packed = ", 4-bit weights" if backend.quantized else ""
    log(f"backend {backend.name} on {device} ({str(dtype).removeprefix('torch.')} compute{packed}), "
        f"{model_dir} loaded in {time.perf_counter() - start:.1f} s (imports included)")
    return backend


def unsloth_importable(log: Callable[[str], None]) -> bool:
    try:
        importlib.import_module("unsloth")
        return True
    except Exception as error:  # noqa: BLE001 -- unsloth raises plain errors on unsupported hosts
        log(f"unsloth unavailable ({type(error).__name__}: {error}); falling back to transformers+peft")
        return False



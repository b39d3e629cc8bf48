"""The model behind one small interface, split as peft's LoRA tuner is: loading (`load`), the adapter's
operations (`adapter`: reset in place, merge), likelihoods (`likelihood`: loss, prefill, score, the decoding
step), the keys and values kept between passes (`cache`), and `Backend` itself (`model`: which parameters train,
attention kernels, checkpointing, compilation). The search policies that decode on it are kit/decode.py's."""
from kit.backend.cache import Prefix
from kit.backend.load import PeftBackend, UnslothBackend, default_dtype, load_backend, pick_device, resolve_dtype
from kit.backend.model import Backend
from kit.config import LoraSettings

__all__ = ["Backend", "LoraSettings", "PeftBackend", "Prefix", "UnslothBackend", "default_dtype", "load_backend",
           "pick_device", "resolve_dtype"]

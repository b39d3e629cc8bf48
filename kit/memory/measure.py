"""Memory measured on the device: what it can give this process (/proc, cgroups, CUDA), what the process holds
and its peak, and glibc's allocator (mallopt, malloc_trim). torch is imported only where CUDA is asked about."""
from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kit.memory.estimates import KIB, MIB

MARGIN_FRACTION, MARGIN_FLOOR = 0.10, 512 * MIB


def available_memory(device_type: str) -> int:
    """The default budget: what the device can give this process (what it already holds included), less a
    margin of 10% and at least 512 MiB for what no estimate sees (CUDA context, other processes, page cache).

    CUDA: free device memory plus this process's reserved memory. CPU: MemAvailable plus this process's RSS,
    capped by the cgroup's limit when one is set (containers: /proc/meminfo shows the whole host)."""
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        usable = free + torch.cuda.memory_reserved()
    elif device_type == "cpu":
        rss = _status_bytes("VmRSS")
        usable = min(_meminfo_bytes("MemAvailable"), _cgroup_headroom()) + rss
    else:
        raise ValueError(f"no memory budget for device type {device_type!r}: expected cuda or cpu")
    return max(0, usable - max(int(usable * MARGIN_FRACTION), MARGIN_FLOOR))


def device_share(device_type: str, share: int) -> int:
    """One of `share` workers' part of the device (`--workers-per-gpu`): its total memory split evenly, less the
    margin; what is free at one worker's start would count the others' models twice or not at all."""
    if device_type != "cuda" or share <= 1:
        return available_memory(device_type)
    import torch

    _, total = torch.cuda.mem_get_info()
    return max(0, total // share - max(int(total // share * MARGIN_FRACTION), MARGIN_FLOOR))


def release_device_memory() -> None:
    """After a failure: drop what the failed attempt left (reference cycles, CUDA's cached blocks)."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def steady_cpu_allocator(threshold: int = MIB) -> bool:
    """Make CPU memory follow the live tensors: glibc serves every allocation of `threshold` bytes or more
    with its own mmap, returned to the system when freed.

    By default glibc raises that threshold up to 32 MiB as large buffers are freed; activations of a few MiB
    then land in the heap, where the ones kept for backward pin the memory around them and the resident set
    climbs far above the tensors alive (measured on a checkpointed 1x1024 step of SmolLM2-135M: 1113 MiB added
    against 174 MiB with a fixed 1 MiB threshold). The CPU estimates assume this setting. Process-wide;
    returns False where glibc is not the allocator (musl, macOS)."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB  # where glibc's dynamic threshold tops out on 64-bit


@contextmanager
def heap_follows_tensors(on: bool) -> Iterator[None]:
    """Inside: the steady allocator (`steady_cpu_allocator`); after: glibc's own top threshold (32 MiB: what
    its dynamic threshold climbs to in a task) and the heap trimmed. For checkpointed CPU training, where
    the heap otherwise keeps recomputed activations of 1-4 MiB: measured on d5c634a2 (2 x 710 tokens, fp32,
    2 steps, SmolLM2-135M) 316 MiB added against an estimate of 388 MiB, 1696 MiB with the default, at
    1.16x the step time (55.4 s against 47.9 s). The whole task under it cost 1.97x (bench/cpu_allocator.py),
    so it is scoped to that training. `on` False, or no glibc: nothing changes."""
    steady = on and steady_cpu_allocator(MIB)
    try:
        yield
    finally:
        if steady:
            steady_cpu_allocator(GLIBC_MMAP_THRESHOLD_MAX)
            trim_cpu_heap()


def trim_cpu_heap() -> bool:
    """Hand the heap's free memory back to the system (glibc malloc_trim), so that one task's freed
    activations do not count as resident when the next task is planned. False where glibc is absent."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim); None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def resident_memory(device_type: str) -> int:
    """What the process holds now: CUDA tensors allocated, or the CPU resident set (VmRSS)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.memory_allocated()
    if device_type == "cpu":
        return _status_bytes("VmRSS")
    raise ValueError(f"no resident memory for device type {device_type!r}: expected cuda or cpu")


def reset_peak(device_type: str) -> bool:
    """Restart peak tracking. CPU: writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS (Linux
    4.0+); where that file is not writable the peak cannot be reset and `peak_memory` falls back to the
    lifetime maximum (getrusage ru_maxrss). Returns whether the peak was reset."""
    if device_type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    if device_type == "cpu":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False
    raise ValueError(f"no peak memory for device type {device_type!r}: expected cuda or cpu")


def peak_memory(device_type: str) -> int:
    """The highest memory held since the last `reset_peak`: CUDA max_memory_allocated, CPU VmHWM (or the
    lifetime ru_maxrss where /proc is not there)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    if device_type == "cpu":
        try:
            return _status_bytes("VmHWM")
        except (OSError, KeyError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # kilobytes on Linux
    raise ValueError(f"no peak memory for device type {device_type!r}: expected cuda or cpu")


class PeakMemory:
    """`with PeakMemory("cpu") as peak: step()` then `peak.peak` (bytes held at the highest point) and
    `peak.added` (above what was resident on entry). `peak.reset` False: the CPU peak could not be reset, so
    `peak.peak` is the lifetime maximum and `peak.added` may overstate."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.resident = self.peak = 0
        self.reset = False

    @property
    def added(self) -> int:
        return max(0, self.peak - self.resident)

    def __enter__(self) -> PeakMemory:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.resident = resident_memory(self.device_type)
        self.reset = reset_peak(self.device_type)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.peak = peak_memory(self.device_type)


def _status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    return _kb_field(Path("/proc/self/status"), field)


def _meminfo_bytes(field: str) -> int:
    return _kb_field(Path("/proc/meminfo"), field)


def _kb_field(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * KIB
    raise KeyError(f"{path} has no field {field}")


def _cgroup_headroom() -> int:
    """Bytes the memory cgroup still allows (its limit less its usage, reclaimable page cache excluded);
    effectively unlimited when there is no cgroup limit."""
    unlimited = 1 << 62
    for limit_file, usage_file, inactive in (("memory.max", "memory.current", "inactive_file"),
                                             ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                              "total_inactive_file")):
        root = Path("/sys/fs/cgroup")
        try:
            limit_text = (root / limit_file).read_text().strip()
            if limit_text == "max" or int(limit_text) >= unlimited:
                return unlimited
            usage = int((root / usage_file).read_text())
            stat = (root / limit_file).parent / ("memory.stat")
            for line in stat.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == inactive:
                    usage -= int(value)
            return max(0, int(limit_text) - usage)
        except (OSError, ValueError):
            continue
    return unlimited

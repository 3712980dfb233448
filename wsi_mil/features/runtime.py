"""Where and how extraction runs: the device, the precision policy, CPU threads, tile loading, batch size.

:func:`resolve_precision` is the precision policy, the one function that decides it (``auto`` by
device, CPU and the encoder preset's default); :func:`autocast_context` applies the precision it chose. Threads follow
``OMP_NUM_THREADS`` or the CPUs this process may use (affinity, capped by a container's CPU quota).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch

from wsi_mil.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]


# --- device and precision ---------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``"auto"`` -> first CUDA device when available, else CPU; anything else as torch understands it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"Invalid device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device!r} requested but CUDA is not available; use --device cpu.")
    return dev


def autocast_context(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """Autocast for ``bf16``/``fp16`` on ``device``; a no-op context for ``fp32`` (the precision is
    :func:`resolve_precision`'s choice: this only applies it)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ConfigError(f"Unknown precision {precision!r}: use fp32, bf16 or fp16.")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, encoder: str | None = None) -> Precision:
    """The precision policy: the precision extraction runs at, decided here and only here.

    ``auto``: the encoder preset's default for the device type (:attr:`EncoderPreset.precision
    <wsi_mil.features.presets.EncoderPreset.precision>`; bf16 for other encoders), where ``bf16`` becomes
    fp16 on a GPU without bf16 and fp32 on a CPU without native bf16. fp16 is refused on the CPU.
    """
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("fp16 autocast is slow and inexact on CPU; use --precision bf16 or fp32.")
        return cast(Precision, precision)
    from wsi_mil.features.presets import get_preset, is_preset

    wanted = get_preset(encoder).precision.get(device.type, "bf16") if encoder and is_preset(encoder) else "bf16"
    if device.type == "cuda":
        return "fp16" if wanted == "bf16" and not torch.cuda.is_bf16_supported() else cast(Precision, wanted)
    if wanted == "bf16" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


# --- host: CPUs, threads, memory ---------------------------------------------------------------------
def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a container's CPU quota (cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a container CPU quota (Docker ``--cpus``,
    Kubernetes limits). Threads beyond the quota are throttled mid-operation, which costs far more
    than they bring."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


def resolve_threads(threads: int | None = None) -> int:
    """torch CPU threads: ``threads``, else ``OMP_NUM_THREADS`` when set, else the CPUs we may use."""
    if threads is None:
        try:
            threads = int(os.environ.get("OMP_NUM_THREADS", ""))
        except ValueError:
            threads = None
    return max(1, threads if threads else available_cpus())


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (unchanged for ``None``), restoring the previous count."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def memory_use_mb() -> dict[str, float]:
    """Resident memory now and at its peak (MB), recorded per slide: a long run must stay flat."""
    out: dict[str, float] = {}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_mb"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux
    except (ImportError, OSError):
        pass
    return out


def describe_device(device: torch.device, n_threads: int) -> str:
    """The device in words, for run records: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {n_threads} threads)"


# --- reading tiles and batching -----------------------------------------------------------------------
def resolve_loader(workers: int, device: torch.device) -> tuple[str, int]:
    """How tiles are read: ``("series", 0)`` for ``workers=0``, ``("processes", N)`` for ``workers=N``;
    ``workers=-1`` (auto): a reading thread on CPU, up to 8 loader processes on CUDA."""
    if workers == 0:
        return "series", 0
    if workers > 0:
        return "processes", workers
    if device.type == "cuda":
        return "processes", max(1, min(8, available_cpus() - 1))
    return "thread", 1


#: ``batch_size: null``: tiles per forward pass by device. On the 2-CPU machines measured (AMD EPYC,
#: avx512_bf16) batch 8 ran 20-60% more tiles/s than 32 or 64 for ResNet-50-trunc (fp32 and bf16) and
#: EfficientNet-Lite0: activations of a small batch stay in cache (benchmarks/encoder_speed.py).
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 128


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """The configured batch size, or the device's default for ``None``."""
    if batch_size is not None:
        return int(batch_size)
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE

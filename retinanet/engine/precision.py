"""The precision policy: which autocast precision a run uses on which device, and what the
CPU can do natively. Train, eval, predict and serve all resolve `amp` settings here."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): elsewhere bf16 autocast
    is emulated and much slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved `amp` setting (None: full precision)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def autocast(amp: str, device_type: str):
    """Autocast in a resolved `amp` precision on `device_type`; for "none" a disabled one."""
    dtype = amp_dtype(amp)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """`(precision, why)` for an `amp` setting on `device`: `auto` picks bf16 on GPUs and
    CPUs with native bf16, fp16 on older GPUs, and full precision on other CPUs."""
    if amp != "auto":
        if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            return amp, "as configured (this CPU has no native bf16: expect it to be much slower than fp32)"
        return amp, "as configured"
    if device.type == "cuda":
        return ("bf16", "GPU with bf16") if torch.cuda.is_bf16_supported() else ("fp16", "GPU without bf16")
    if cpu_has_native_bf16():
        return "bf16", "the CPU has native bf16 (avx512_bf16/amx)"
    return "none", "the CPU has no native bf16, where bf16 autocast is ~15x slower"

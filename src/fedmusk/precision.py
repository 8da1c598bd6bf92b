"""Compute precision of MUSK's forward passes: ``model.precision`` = ``auto``, ``float32`` or ``bfloat16``.

``bfloat16`` runs the forward under ``torch.autocast`` (weights stay float32; matrix products run in bf16). ``auto``
picks bf16 where the hardware has it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX) and float32
elsewhere: on other CPUs bf16 is emulated and slower than float32. fedmusk uses it for the frozen tile embedding of
``fedmusk prepare`` and for training forward passes; evaluation runs in float32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from fedmusk.config import ConfigError, Precision

FLOAT32, BFLOAT16 = "float32", "bfloat16"


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware (CUDA bf16; CPU AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16()
    return False


def _cpu_has_bf16() -> bool:
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    if probes:
        return any(bool(p()) for p in probes)
    try:  # torch without the probes: the kernel's CPU flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``"float32"`` or ``"bfloat16"``: what ``model.precision`` = ``name`` means on ``device``.

    Raises ConfigError naming the setting for an unknown name.
    """
    if name not in list(Precision):
        raise ConfigError(f"model.precision={name!r}: choose one of {[str(p) for p in Precision]}")
    if name == Precision.auto:
        return BFLOAT16 if bf16_native(device) else FLOAT32
    return str(name)


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """The context a forward pass at ``precision`` (a resolved one) runs under: bf16 autocast, or nothing."""
    if precision == BFLOAT16:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()

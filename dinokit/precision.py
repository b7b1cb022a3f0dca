"""Mixed precision: which autocast dtype a device should use, and a grad scaler for fp16.

``auto`` picks bf16 only where it is native: CUDA compute capability 8.0+ (A100, H100, RTX 30xx+)
or a CPU with AVX512-BF16 / AMX. ``torch.cuda.is_bf16_supported()`` is not the test: below sm80
it answers True because bf16 can be *emulated*, which is slow. Below sm80 (P100, V100, T4) ``auto``
picks fp16 with a dynamic loss scaler; a CPU without native bf16 stays in fp32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from dinokit.device import DeviceKind

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(requested: str, kind: DeviceKind) -> str:
    """``auto`` -> bf16 where native, fp16 on older GPUs, fp32 on CPUs without bf16; else as asked."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return requested
    if kind.native_bf16:
        return "bf16"
    return "fp16" if kind.type == "cuda" else "fp32"


def precision_warning(precision: str, kind: DeviceKind) -> str | None:
    """A note when an explicit choice is slow on this device (bf16 emulated below sm80)."""
    if precision == "bf16" and not kind.native_bf16:
        where = f"compute capability {kind.capability}" if kind.type == "cuda" else "this CPU (no AVX512-BF16/AMX)"
        return f"bf16 is emulated on {where}, which is slow; train.precision=auto picks the fast choice here"
    return None


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (start 2^16, halve on overflow, double after 2000 good steps)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")

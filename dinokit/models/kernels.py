"""Which fused attention kernel "FlashAttention on" means on a given device.

PyTorch's ``scaled_dot_product_attention`` has three kernels: FlashAttention-2 (``flash``), the
memory-efficient kernel (``efficient``, xFormers/CUTLASS) and the explicit ``math`` fallback.
Restricting SDPA to a kernel the device lacks stops with "No available kernel", so the choice is
made from what the device can do (constraints from PyTorch's ``sdp_utils.cpp``):

* CUDA flash: compute capability 8.0+ (A100, H100, RTX 30xx+), fp16/bf16, head dim <= 256 and a
  multiple of 8;
* CUDA efficient: capability 5.0+ in fp16/fp32, plus bf16 on 8.0+; the IO-aware choice elsewhere
  (fp32 on any GPU; every dtype on a P100, V100 or T4);
* CPU: a tiled flash kernel for every dtype;
* ``math`` only where neither fused kernel runs (bf16 below sm80, which ``auto`` precision avoids).

:func:`choose_sdpa_kernel` is the pure decision (table-tested); :func:`sdpa_kernel_for` applies it
to real tensors and, once per (device, dtype, head dim), proves it with a tiny call, falling back
down the list with a warning instead of crashing if this PyTorch build disagrees.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from dinokit.device import DeviceKind, device_kind

log = logging.getLogger(__name__)

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
KERNEL_NAMES = {
    "flash": "FlashAttention-2 (SDPA flash kernel)",
    "efficient": "memory-efficient attention (SDPA efficient kernel)",
    "math": "explicit softmax (SDPA math kernel)",
    "flash-attn": "FlashAttention-2 (Dao-AILab flash-attn package)",
    "naive": "explicit softmax (naive, FlashAttention off)",
}
FALLBACK = {"flash": ["flash", "efficient", "math"], "efficient": ["efficient", "math"], "math": ["math"]}


def choose_sdpa_kernel(kind: DeviceKind, dtype: torch.dtype, head_dim: int) -> str:
    """The best IO-aware SDPA kernel for (device, dtype, head dim): ``flash``, ``efficient`` or ``math``."""
    if kind.type != "cuda":
        return "flash"
    cap = kind.capability or (0, 0)
    half = dtype in (torch.float16, torch.bfloat16)
    if cap >= (8, 0) and half and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    efficient_dtypes = (
        (torch.float16, torch.float32, torch.bfloat16) if cap >= (8, 0) else (torch.float16, torch.float32)
    )
    if cap >= (5, 0) and dtype in efficient_dtypes:
        return "efficient"
    return "math"


def flash_attn_problem(kind: DeviceKind) -> str | None:
    """Why the Dao-AILab ``flash-attn`` backend cannot run on ``kind`` (None: it can)."""
    if kind.type != "cuda":
        return "attention backend 'flash-attn' needs a CUDA GPU; use 'sdpa' (PyTorch's flash kernel) instead"
    if (kind.capability or (0, 0)) < (8, 0):
        return (
            f"attention backend 'flash-attn' needs compute capability 8.0+ (Ampere or newer); this "
            f"{kind.name or 'GPU'} is {kind.capability[0]}.{kind.capability[1]}. Use model.attention=sdpa: "
            "it picks the memory-efficient kernel here"
        )
    return None


def _probe(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    q = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
    try:
        with torch.nn.attention.sdpa_kernel([KERNELS[kernel]]):
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


@lru_cache(maxsize=64)
def _verified(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    chosen = choose_sdpa_kernel(device_kind(device), dtype, head_dim)
    for kernel in FALLBACK[chosen]:
        if _probe(kernel, device, dtype, head_dim):
            if kernel != chosen:
                log.warning("SDPA %s kernel unavailable for %s on %s; using %s", chosen, dtype, device, kernel)
            return kernel
    return "math"


@torch.compiler.assume_constant_result  # torch.compile: evaluate once while tracing, not traced into
def _kernel_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    return _verified(device, dtype, head_dim)


def sdpa_kernel_for(q: torch.Tensor) -> str:
    """The kernel ``attention=sdpa`` runs for tensors like ``q`` (b, h, n, d) on this device."""
    return _kernel_for(q.device, q.dtype, int(q.shape[-1]))


def describe_attention(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """What runs for ``backend`` at training dtype, in words (for run_info.json, bench records, the report)."""
    device = torch.device(device)
    if backend == "sdpa":
        kernel = _verified(device, dtype, head_dim)
        if kernel == "flash" and device.type == "cpu":
            return "FlashAttention (SDPA flash kernel, tiled for the CPU)"
        return KERNEL_NAMES[kernel]
    if backend.startswith("sdpa-"):
        return KERNEL_NAMES[backend.removeprefix("sdpa-")]
    return KERNEL_NAMES.get(backend, backend)

"""Which fused exact-attention kernel "FlashAttention on" means on a given device.

PyTorch's ``scaled_dot_product_attention`` (SDPA) has four kernels that compute the same exact
softmax(QK^T / sqrt(d)) V: FlashAttention-2 (``flash``), cuDNN's fused attention (``cudnn``), the
memory-efficient kernel (``efficient``, xFormers/CUTLASS) and the explicit ``math`` fallback. They
differ in speed and in what they accept (PyTorch's ``sdp_utils.cpp``):

* ``flash``: CUDA sm80+ (A100, H100, RTX 30xx+), fp16/bf16, head dim <= 256 and a multiple of 8
  (<= 192 on sm86/sm89, whose backward lacks the shared memory); on the CPU a tiled flash kernel
  for every dtype, the CPU's only fused kernel;
* ``cudnn``: CUDA sm80+, fp16/bf16, head dim a multiple of 8 and <= 128 (256 on sm90 with cuDNN
  9.10+). It is written for Hopper's asynchronous tensor-core instructions, which FlashAttention-2
  predates;
* ``efficient``: CUDA sm50+ in fp16/fp32, plus bf16 on sm80+: the IO-aware choice for fp32 on any
  GPU and for every dtype on a P100, V100 or T4;
* ``math`` only where none of them runs (bf16 below sm80, which ``auto`` precision avoids).

So "on" is a short ordered list, not one kernel. :func:`sdpa_candidates` (pure, table-tested) lists
what the device accepts, cuDNN first on sm90+. Once per (device, dtype, head dim) each candidate is
checked with a tiny call against the explicit softmax (one this PyTorch build refuses is dropped,
with a warning). Where several remain on a GPU, a short timing puts the fastest first, separately
for a forward alone (inference, the EMA teacher) and a forward + backward (the student), because
the winner differs: on an H200 (torch 2.11, bf16, head dim 64) cuDNN has the faster forward and
FlashAttention-2 the faster forward + backward; at head dim 256 cuDNN wins both. SDPA gets the
whole list in that order (where this torch has ``set_priority``; older ones get the leader alone),
so a call the leader cannot take runs on the next kernel instead of failing.

The Dao-AILab ``flash-attn`` package is a separate backend: FlashAttention-3 (``flash_attn_interface``)
on Hopper when it is installed, else FlashAttention-2 (``flash_attn``) on sm80+.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinokit.device import DeviceKind, device_kind

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
if (_cudnn := getattr(SDPBackend, "CUDNN_ATTENTION", None)) is not None:  # torch 2.3+
    KERNELS["cudnn"] = _cudnn
# With set_priority SDPA tries an enabled list in our order; without it, in its own, so it gets the leader alone.
SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
KERNEL_NAMES = {
    "flash": "FlashAttention-2 (SDPA flash kernel)",
    "cudnn": "cuDNN attention (SDPA cudnn kernel)",
    "efficient": "memory-efficient attention (SDPA efficient kernel)",
    "math": "explicit softmax (SDPA math kernel)",
    "flash-attn": "FlashAttention-2 (Dao-AILab flash-attn package)",
    "flash-attn-3": "FlashAttention-3 (Dao-AILab flash_attn_interface, Hopper)",
    "naive": "explicit softmax (naive, FlashAttention off)",
}
FLASH_ATTN_MODULES = ("flash_attn", "flash_attn_interface")  # FlashAttention-2, FlashAttention-3
PROBE_SHAPE = (8, 6, 785)  # images, heads, tokens: ViT-S/8 at 224 px, a small batch


def sdpa_candidates(kind: DeviceKind, dtype: torch.dtype, head_dim: int) -> list[str]:
    """SDPA kernels that accept (device, dtype, head dim), in the order to try them."""
    if kind.type != "cuda":
        return ["flash"]
    cap = kind.capability or (0, 0)
    half, aligned = dtype in HALF, head_dim % 8 == 0
    accepts = {
        "flash": cap >= (8, 0) and half and aligned and head_dim <= (192 if cap in ((8, 6), (8, 9)) else 256),
        "cudnn": cap >= (8, 0) and half and aligned and head_dim <= (256 if cap == (9, 0) else 128),
        "efficient": cap >= (5, 0) and (dtype in (torch.float16, torch.float32) or (half and cap >= (8, 0))),
    }
    order = ("cudnn", "flash", "efficient") if cap >= (9, 0) else ("flash", "cudnn", "efficient")
    return [k for k in order if accepts[k]] or ["math"]


def rank_by_speed(kernels: list[str], seconds: Callable[[str], float]) -> list[str]:
    """``kernels`` fastest first; ties and failed timings (inf) keep the given order."""
    times = {k: seconds(k) for k in kernels}
    return sorted(kernels, key=times.__getitem__)


@contextlib.contextmanager
def _measuring(device: torch.device) -> Iterator[None]:
    """Real autograd in the probe's dtype, even when called under no_grad, inference_mode or autocast."""
    cuda = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with cuda, torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield


def _runs(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """A tiny call in the training's layout (q, k, v views of one packed qkv; then fewer queries than
    keys) runs on ``kernel`` alone and matches the explicit softmax."""
    if kernel not in KERNELS:
        return False
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    try:
        with _measuring(device), sdpa_kernel([KERNELS[kernel]]):
            qkv = torch.randn(2, 16, 3, 2, head_dim, device=device, dtype=dtype)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            for query in (q, q[:, :, ::3].contiguous()):
                out = F.scaled_dot_product_attention(query, k, v).float()
                ref = (query.float() @ k.float().transpose(-2, -1) * head_dim**-0.5).softmax(-1) @ v.float()
                if not torch.allclose(out, ref, atol=tol, rtol=tol):
                    log.warning("SDPA %s kernel disagrees with the explicit softmax on %s", kernel, device)
                    return False
        return True
    except Exception as err:  # whatever this build raises, the next candidate is tried
        log.info("SDPA %s kernel does not run for %s, head dim %d on %s: %s", kernel, dtype, head_dim, device, err)
        return False


def _event_seconds(fn: Callable[[], None], repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _timings(
    kernels: list[str], device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool = True, rounds: int = 5
) -> dict[str, float]:
    """Seconds per forward (+ backward) of each kernel on :data:`PROBE_SHAPE`: the best of ``rounds``
    interleaved rounds after one of warm-up. Interleaved because the GPU's clock rises while it works,
    so kernels timed one after the other would favour the last. A kernel that fails gets inf."""
    times = dict.fromkeys(kernels, math.inf)
    b, h, n = PROBE_SHAPE
    with _measuring(device):
        try:
            qkv = torch.randn(b, n, 3, h, head_dim, device=device, dtype=dtype, requires_grad=backward)
            grad = torch.randn(b, h, n, head_dim, device=device, dtype=dtype)
        except Exception as err:  # out of memory, say: no timings, the given order stands
            log.info("timing SDPA kernels on %s failed: %s", device, err)
            return times

        def step(kernel: str) -> None:
            with sdpa_kernel([KERNELS[kernel]]):
                out = F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
            if backward:
                torch.autograd.grad(out, qkv, grad)

        alive = list(kernels)
        for round_ in range(rounds + 1):  # round 0 warms up: cuDNN builds its plan, the clock rises
            for kernel in list(alive):
                try:
                    seconds = _event_seconds(lambda kernel=kernel: step(kernel), repeats=5)
                except Exception as err:  # a kernel that fails here is ranked last, never fatal
                    log.info("timing the SDPA %s kernel on %s failed: %s", kernel, device, err)
                    alive.remove(kernel)
                    continue
                if round_:
                    times[kernel] = min(times[kernel], seconds)
    return times


@lru_cache(maxsize=64)
def _working(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    """The candidates that pass the tiny call here, in :func:`sdpa_candidates`' order (checked once)."""
    candidates = sdpa_candidates(device_kind(device), dtype, head_dim)
    working = tuple(k for k in candidates if _runs(k, device, dtype, head_dim))
    if not working:
        log.warning("no SDPA %s kernel runs for %s on %s; using math", "/".join(candidates), dtype, device)
        return ("math",)
    if working[0] != candidates[0]:
        log.warning("SDPA %s kernel unavailable for %s on %s; using %s", candidates[0], dtype, device, working[0])
    return working


@lru_cache(maxsize=64)
def _ranked(device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool) -> tuple[str, ...]:
    """The working kernels, fastest first for a forward alone or with its backward (timed once on a GPU
    where there is a choice: on an H200, cuDNN has the faster forward and FlashAttention-2 the faster
    forward + backward at head dim 64)."""
    working = list(_working(device, dtype, head_dim))
    if device.type == "cuda" and len(working) > 1:
        working = rank_by_speed(working, _timings(working, device, dtype, head_dim, backward).__getitem__)
        mode = "forward + backward" if backward else "forward"
        log.info(
            "SDPA kernels for %s, head dim %d, %s on %s, fastest first: %s", dtype, head_dim, mode, device, working
        )
    return tuple(working)


def _normalized(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@torch.compiler.assume_constant_result  # torch.compile: evaluate once while tracing, not traced into
def _kernels_for(device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool) -> tuple[str, ...]:
    return _ranked(_normalized(device), dtype, head_dim, backward)


def sdpa_kernel_for(q: torch.Tensor) -> str:
    """The kernel ``attention=sdpa`` runs for tensors like ``q`` (b, h, n, d) on this device (with a
    backward if ``q`` requires grad: the student; without, inference and the EMA teacher)."""
    return _kernels_for(q.device, q.dtype, int(q.shape[-1]), q.requires_grad)[0]


def sdpa_context(q: torch.Tensor) -> contextlib.AbstractContextManager:
    """Restrict SDPA to the ranked kernels for ``q``: the leader first, the others as its fallbacks."""
    backends = [KERNELS[k] for k in _kernels_for(q.device, q.dtype, int(q.shape[-1]), q.requires_grad)]
    return sdpa_kernel(backends, set_priority=True) if SET_PRIORITY else sdpa_kernel(backends[:1])


@lru_cache(maxsize=1)
def flash_attn_packages() -> frozenset[str]:
    """The Dao-AILab modules installed here (a lookup, not an import: importing them takes seconds)."""
    return frozenset(m for m in FLASH_ATTN_MODULES if importlib.util.find_spec(m) is not None)


def flash_attn_kernel(kind: DeviceKind, packages: frozenset[str]) -> str | None:
    """``flash-attn-3`` on Hopper with FlashAttention-3 installed, else ``flash-attn`` (FlashAttention-2)
    on sm80+ with ``flash_attn`` installed; None where neither runs."""
    cap = kind.capability or (0, 0)
    if kind.type != "cuda" or cap < (8, 0):
        return None
    if cap[0] == 9 and "flash_attn_interface" in packages:
        return "flash-attn-3"
    return "flash-attn" if "flash_attn" in packages else None


@torch.compiler.assume_constant_result  # torch.compile: a constant, like _kernels_for
def flash_attn_kernel_for(device: torch.device) -> str:
    """The Dao-AILab kernel ``attention=flash-attn`` runs on ``device`` (FlashAttention-2 if none fits)."""
    return flash_attn_kernel(device_kind(device), flash_attn_packages()) or "flash-attn"


def flash_attn_problem(kind: DeviceKind, packages: frozenset[str] | None = None) -> str | None:
    """Why the Dao-AILab ``flash-attn`` backend cannot run on ``kind`` (None: it can)."""
    if kind.type != "cuda":
        return "attention backend 'flash-attn' needs a CUDA GPU; use 'sdpa' (PyTorch's fused kernels) instead"
    if (kind.capability or (0, 0)) < (8, 0):
        return (
            f"attention backend 'flash-attn' needs compute capability 8.0+ (Ampere or newer); this "
            f"{kind.name or 'GPU'} is {kind.capability[0]}.{kind.capability[1]}. Use model.attention=sdpa: "
            "it picks the memory-efficient kernel here"
        )
    if flash_attn_kernel(kind, flash_attn_packages() if packages is None else packages) is None:
        return (
            "attention backend 'flash-attn' needs the Dao-AILab flash-attn package (pip install -r "
            "requirements-gpu.txt; FlashAttention-3's flash_attn_interface alone covers only Hopper). "
            "Or use 'sdpa' (model.attention=sdpa): PyTorch's fused kernels need no package"
        )
    return None


def describe_attention(
    backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool = True
) -> str:
    """What runs for ``backend`` at training dtype, in words (for run_info.json, bench records, the report).

    ``backward``: the kernel for a training step (the default) or, False, for inference."""
    device = _normalized(device)
    if backend == "sdpa":
        kernel = _ranked(device, dtype, head_dim, backward)[0]
        if kernel == "flash" and device.type == "cpu":
            return "FlashAttention (SDPA flash kernel, tiled for the CPU)"
        return KERNEL_NAMES[kernel]
    if backend.startswith("sdpa-"):
        return KERNEL_NAMES[backend.removeprefix("sdpa-")]
    if backend == "flash-attn":
        return KERNEL_NAMES[flash_attn_kernel_for(device)]
    return KERNEL_NAMES.get(backend, backend)

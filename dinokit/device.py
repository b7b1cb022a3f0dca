"""Which device to compute on, and what it can do.

``--device auto|cpu|cuda|cuda:N`` on every command that computes goes through
:func:`resolve_device`. What the device *can* do (CUDA compute capability, native bf16 on a CPU)
is read once into a :class:`DeviceKind`; the decisions that depend on it (precision in
:mod:`dinokit.precision`, the attention kernel in :mod:`dinokit.models.kernels`) are pure
functions of a ``DeviceKind``, so they are table-tested for GPUs this machine does not have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """The requested device does not exist here; the message says what is available."""


@dataclass(frozen=True)
class DeviceKind:
    """What a device can do, as far as dinokit's decisions are concerned."""

    type: str  # "cpu" | "cuda"
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (8, 0) for an A100
    cpu_bf16: bool = False  # AVX512-BF16 or AMX: bf16 matmuls are native on this CPU
    name: str = ""

    @property
    def native_bf16(self) -> bool:
        """bf16 runs in hardware (Ampere+ tensor cores, AVX512-BF16/AMX), not emulated."""
        if self.type == "cuda":
            return self.capability is not None and self.capability >= (8, 0)
        return self.cpu_bf16


# The GPUs students actually get, for tables and tests (capability from NVIDIA's CUDA GPU list).
KNOWN_GPUS = {
    "P100": DeviceKind("cuda", (6, 0), name="Tesla P100"),
    "V100": DeviceKind("cuda", (7, 0), name="Tesla V100"),
    "T4": DeviceKind("cuda", (7, 5), name="Tesla T4"),
    "A100": DeviceKind("cuda", (8, 0), name="NVIDIA A100"),
    "H100": DeviceKind("cuda", (9, 0), name="NVIDIA H100"),
}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """AVX512-BF16 / AMX: bf16 autocast is ~1.2-1.8x faster than fp32 on such CPUs (DESIGN.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` is CUDA when present (this process's ``LOCAL_RANK`` GPU under torchrun), else CPU.

    Asking for CUDA on a machine without it fails here, before any work starts.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: no CUDA GPU is visible to PyTorch here (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False). Use --device cpu, or install a CUDA build of torch "
                "on a machine with an NVIDIA GPU (see README, 'On a GPU')."
            )
        index = int(os.environ.get("LOCAL_RANK", "0")) if spec == "cuda" else _index(spec)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}; use {DEVICE_CHOICES}")


def _index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise DeviceError(f"unknown device {spec!r}; use {DEVICE_CHOICES}") from None


def device_kind(device: torch.device | str) -> DeviceKind:
    """Read what ``device`` can do (the only impure step before the pure decisions)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceKind("cuda", torch.cuda.get_device_capability(index), name=torch.cuda.get_device_name(index))
    return DeviceKind("cpu", cpu_bf16=cpu_has_bf16(), name=_cpu_name())


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def device_name(device: torch.device | str) -> str:
    """A human name for reports: the GPU's model, or the CPU's model and core count."""
    kind = device_kind(device)
    return kind.name if kind.type == "cuda" else f"{kind.name} ({os.cpu_count()} cores)"


def is_cpu_name(name: str) -> bool:
    """Whether a :func:`device_name` (as saved in results) names a CPU: those end in their core count."""
    return name.endswith(" cores)")


def peak_memory_mb(device: torch.device | str) -> float:
    """CUDA's peak allocation on a GPU; this process's peak resident set (VmHWM) on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # native Windows: no resource module, and no /proc
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device``: a timing boundary. Nothing to wait for on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)

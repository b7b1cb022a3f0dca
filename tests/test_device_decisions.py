"""Device decisions as table tests over the GPUs students get: kernel, precision, flash-attn, device."""

import pytest
import torch

from dinokit.device import KNOWN_GPUS, DeviceError, DeviceKind, resolve_device
from dinokit.models.kernels import choose_sdpa_kernel, flash_attn_problem
from dinokit.precision import choose_precision, precision_warning

CPU = DeviceKind("cpu", cpu_bf16=False)
CPU_BF16 = DeviceKind("cpu", cpu_bf16=True)
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (device, dtype) -> the kernel "FlashAttention on" must run. FlashAttention-2 needs sm80+ and a half
# dtype; the memory-efficient kernel runs fp16/fp32 from sm50 and bf16 from sm80 (PyTorch sdp_utils.cpp).
P100, V100, T4, A100, H100 = (KNOWN_GPUS[k] for k in ("P100", "V100", "T4", "A100", "H100"))
KERNEL_TABLE = [
    (CPU, FP32, "flash"), (CPU, FP16, "flash"), (CPU, BF16, "flash"),
    (P100, FP32, "efficient"), (P100, FP16, "efficient"), (P100, BF16, "math"),
    (V100, FP32, "efficient"), (V100, FP16, "efficient"), (V100, BF16, "math"),
    (T4, FP32, "efficient"), (T4, FP16, "efficient"), (T4, BF16, "math"),
    (A100, FP32, "efficient"), (A100, FP16, "flash"), (A100, BF16, "flash"),
    (H100, FP32, "efficient"), (H100, FP16, "flash"), (H100, BF16, "flash"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "dtype", "kernel"), KERNEL_TABLE, ids=lambda x: getattr(x, "name", str(x)))
def test_attention_kernel_by_capability(kind: DeviceKind, dtype: torch.dtype, kernel: str) -> None:
    assert choose_sdpa_kernel(kind, dtype, head_dim=64) == kernel  # ViT-S: 6 heads of 64


def test_flash_kernel_needs_a_head_dim_it_supports() -> None:
    a100 = KNOWN_GPUS["A100"]
    assert choose_sdpa_kernel(a100, BF16, head_dim=256) == "flash"
    assert choose_sdpa_kernel(a100, BF16, head_dim=320) == "efficient"  # FlashAttention-2: head dim <= 256
    assert choose_sdpa_kernel(a100, FP16, head_dim=60) == "efficient"  # and a multiple of 8


# auto precision: bf16 only where native; fp16 (with loss scaling) on older GPUs; fp32 on plain CPUs.
PRECISION_TABLE = [
    (CPU, "fp32"), (CPU_BF16, "bf16"), (KNOWN_GPUS["P100"], "fp16"), (KNOWN_GPUS["V100"], "fp16"),
    (KNOWN_GPUS["T4"], "fp16"), (KNOWN_GPUS["A100"], "bf16"), (KNOWN_GPUS["H100"], "bf16"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "precision"), PRECISION_TABLE, ids=lambda x: getattr(x, "name", str(x)))
def test_auto_precision_by_capability(kind: DeviceKind, precision: str) -> None:
    assert choose_precision("auto", kind) == precision
    # whatever auto picks, "FlashAttention on" has a fused kernel for it: never "No available kernel"
    assert choose_sdpa_kernel(kind, {"fp32": FP32, "fp16": FP16, "bf16": BF16}[precision], 64) != "math"


def test_explicit_precision_is_kept_and_emulated_bf16_is_flagged() -> None:
    t4 = KNOWN_GPUS["T4"]
    assert choose_precision("bf16", t4) == "bf16"
    assert "emulated" in precision_warning("bf16", t4)
    assert precision_warning("bf16", KNOWN_GPUS["A100"]) is None
    assert precision_warning("fp16", t4) is None
    with pytest.raises(ValueError, match="train.precision"):
        choose_precision("int8", t4)


@pytest.mark.parametrize("gpu", ["P100", "V100", "T4"])
def test_flash_attn_package_below_sm80_names_sdpa(gpu: str) -> None:
    problem = flash_attn_problem(KNOWN_GPUS[gpu])
    assert problem and "8.0" in problem and "model.attention=sdpa" in problem


def test_flash_attn_package_is_fine_on_ampere_and_hopper() -> None:
    assert flash_attn_problem(KNOWN_GPUS["A100"]) is None and flash_attn_problem(KNOWN_GPUS["H100"]) is None
    assert "sdpa" in flash_attn_problem(CPU)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(DeviceError, match="no CUDA GPU"):
                resolve_device(spec)


def test_the_kernel_that_runs_here_is_the_chosen_one() -> None:
    """On this machine's CPU, the verified kernel is the decision (no silent fallback)."""
    from dinokit.models.kernels import describe_attention, sdpa_kernel_for

    for dtype in (FP32, BF16, FP16):
        assert sdpa_kernel_for(torch.zeros(1, 2, 5, 16, dtype=dtype)) == "flash"
    assert describe_attention("sdpa", torch.device("cpu"), FP32, 64).startswith("FlashAttention (SDPA flash")
    assert describe_attention("naive", torch.device("cpu"), FP32, 64).startswith("explicit softmax")

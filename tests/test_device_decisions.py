"""Device decisions as table tests over the GPUs students get: kernel, precision, flash-attn, device."""

from pathlib import Path

import pytest
import torch

from dinokit.device import KNOWN_GPUS, DeviceError, DeviceKind, resolve_device
from dinokit.models.kernels import flash_attn_kernel, flash_attn_problem, rank_by_speed, sdpa_candidates
from dinokit.precision import choose_precision, precision_warning

CPU = DeviceKind("cpu", cpu_bf16=False)
CPU_BF16 = DeviceKind("cpu", cpu_bf16=True)
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
P100, V100, T4, A100, H100 = (KNOWN_GPUS[k] for k in ("P100", "V100", "T4", "A100", "H100"))
H200 = DeviceKind("cuda", (9, 0), name="NVIDIA H200")
RTX3090 = DeviceKind("cuda", (8, 6), name="NVIDIA GeForce RTX 3090")
FLASH_CUDNN, CUDNN_FLASH = ["flash", "cudnn", "efficient"], ["cudnn", "flash", "efficient"]

# (device, dtype) -> the kernels "FlashAttention on" tries, in order, at ViT-S's head dim 64 (and 80).
# FlashAttention-2 and cuDNN need sm80+ and a half dtype (cuDNN leads on Hopper); the memory-efficient
# kernel runs fp16/fp32 from sm50 and bf16 from sm80 (PyTorch sdp_utils.cpp); the CPU has one, flash.
KERNEL_TABLE = [
    (CPU, FP32, ["flash"]), (CPU, FP16, ["flash"]), (CPU, BF16, ["flash"]),
    (P100, FP32, ["efficient"]), (P100, FP16, ["efficient"]), (P100, BF16, ["math"]),
    (V100, FP32, ["efficient"]), (V100, FP16, ["efficient"]), (V100, BF16, ["math"]),
    (T4, FP32, ["efficient"]), (T4, FP16, ["efficient"]), (T4, BF16, ["math"]),
    (A100, FP32, ["efficient"]), (A100, FP16, FLASH_CUDNN), (A100, BF16, FLASH_CUDNN),
    (H100, FP32, ["efficient"]), (H100, FP16, CUDNN_FLASH), (H100, BF16, CUDNN_FLASH),
    (H200, FP32, ["efficient"]), (H200, FP16, CUDNN_FLASH), (H200, BF16, CUDNN_FLASH),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "dtype", "kernels"), KERNEL_TABLE, ids=lambda x: getattr(x, "name", str(x)))
def test_attention_kernels_by_capability(kind: DeviceKind, dtype: torch.dtype, kernels: list[str]) -> None:
    assert sdpa_candidates(kind, dtype, head_dim=64) == kernels  # ViT-S: 6 heads of 64
    assert sdpa_candidates(kind, dtype, head_dim=80) == kernels  # a multiple of 8 under every limit
    if kind.type == "cpu" or kind.capability < (8, 0) or dtype == FP32:  # no head-dim limit applies
        assert sdpa_candidates(kind, dtype, 256) == sdpa_candidates(kind, dtype, 320) == kernels


# Half precision on sm80+: flash takes head dims <= 256 (192 on sm86/89), cuDNN <= 128 (256 on sm90),
# both multiples of 8; the memory-efficient kernel has no limit.
HEAD_DIM_TABLE = [
    (A100, 256, ["flash", "efficient"]), (A100, 320, ["efficient"]), (A100, 60, ["efficient"]),
    (H100, 256, CUDNN_FLASH), (H100, 320, ["efficient"]), (H200, 256, CUDNN_FLASH),
    (RTX3090, 128, FLASH_CUDNN), (RTX3090, 192, ["flash", "efficient"]), (RTX3090, 256, ["efficient"]),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "head_dim", "kernels"), HEAD_DIM_TABLE, ids=str)
def test_fused_kernels_need_a_head_dim_they_support(kind: DeviceKind, head_dim: int, kernels: list[str]) -> None:
    assert sdpa_candidates(kind, BF16, head_dim) == sdpa_candidates(kind, FP16, head_dim) == kernels


def test_the_fastest_kernel_leads_and_a_failed_timing_goes_last() -> None:
    times = {"cudnn": 2e-3, "flash": 1e-3, "efficient": float("inf")}
    assert rank_by_speed(["efficient", "cudnn", "flash"], times.__getitem__) == ["flash", "cudnn", "efficient"]
    assert rank_by_speed(["cudnn", "flash"], lambda k: 1.0) == ["cudnn", "flash"]  # a tie keeps our order


# auto precision: bf16 only where native; fp16 (with loss scaling) on older GPUs; fp32 on plain CPUs.
PRECISION_TABLE = [
    (CPU, "fp32"), (CPU_BF16, "bf16"), (KNOWN_GPUS["P100"], "fp16"), (KNOWN_GPUS["V100"], "fp16"),
    (KNOWN_GPUS["T4"], "fp16"), (KNOWN_GPUS["A100"], "bf16"), (KNOWN_GPUS["H100"], "bf16"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "precision"), PRECISION_TABLE, ids=lambda x: getattr(x, "name", str(x)))
def test_auto_precision_by_capability(kind: DeviceKind, precision: str) -> None:
    assert choose_precision("auto", kind) == precision
    # whatever auto picks, "FlashAttention on" has a fused kernel for it: never "No available kernel"
    assert sdpa_candidates(kind, {"fp32": FP32, "fp16": FP16, "bf16": BF16}[precision], 64)[0] != "math"


def test_explicit_precision_is_kept_and_emulated_bf16_is_flagged() -> None:
    t4 = KNOWN_GPUS["T4"]
    assert choose_precision("bf16", t4) == "bf16"
    assert "emulated" in precision_warning("bf16", t4)
    assert precision_warning("bf16", KNOWN_GPUS["A100"]) is None
    assert precision_warning("fp16", t4) is None
    with pytest.raises(ValueError, match="train.precision"):
        choose_precision("int8", t4)


FA2, FA2_FA3 = frozenset({"flash_attn"}), frozenset({"flash_attn", "flash_attn_interface"})


@pytest.mark.parametrize("gpu", ["P100", "V100", "T4"])
def test_flash_attn_package_below_sm80_names_sdpa(gpu: str) -> None:
    problem = flash_attn_problem(KNOWN_GPUS[gpu], FA2_FA3)
    assert problem and "8.0" in problem and "model.attention=sdpa" in problem
    assert flash_attn_kernel(KNOWN_GPUS[gpu], FA2_FA3) is None


def test_flash_attn_package_is_fine_on_ampere_and_hopper() -> None:
    assert flash_attn_problem(A100, FA2) is None and flash_attn_problem(H100, FA2) is None
    assert "use 'sdpa'" in flash_attn_problem(CPU, FA2_FA3)


def test_flash_attn_without_the_package_names_sdpa() -> None:
    for kind in (A100, H100):
        problem = flash_attn_problem(kind, frozenset())
        assert "requirements-gpu.txt" in problem and "use 'sdpa'" in problem
    assert "Hopper" in flash_attn_problem(A100, frozenset({"flash_attn_interface"}))  # FlashAttention-3 alone
    assert flash_attn_problem(H100, frozenset({"flash_attn_interface"})) is None


def test_flash_attn_3_on_hopper_when_installed_else_2() -> None:
    assert flash_attn_kernel(H100, FA2_FA3) == flash_attn_kernel(H200, FA2_FA3) == "flash-attn-3"
    assert flash_attn_kernel(H100, FA2) == flash_attn_kernel(A100, FA2_FA3) == "flash-attn"
    assert flash_attn_kernel(CPU, FA2_FA3) is None


def test_check_backend_agrees_with_flash_attn_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """attention=flash-attn is refused at model build exactly where the training would refuse it."""
    from dinokit.models import attention, kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for kind, packages, accepted in ((A100, FA2, True), (A100, frozenset(), False), (T4, FA2, False)):
        monkeypatch.setattr(attention, "device_kind", lambda device, kind=kind: kind)
        monkeypatch.setattr(kernels, "flash_attn_packages", lambda packages=packages: packages)
        assert attention.flash_attn_available() is accepted
        if accepted:
            attention.check_backend("flash-attn")
        else:
            with pytest.raises(ValueError, match="sdpa") as err:
                attention.check_backend("flash-attn")
            assert str(err.value) == flash_attn_problem(kind, packages)


def test_describe_attention_names_the_kernel_that_won(monkeypatch: pytest.MonkeyPatch) -> None:
    from dinokit.models import kernels

    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "_ranked", lambda device, dtype, head_dim, backward: ("cudnn", "efficient")[backward:])
    assert kernels.describe_attention("sdpa", cpu, BF16, 64, backward=False) == "cuDNN attention (SDPA cudnn kernel)"
    assert kernels.describe_attention("sdpa", cpu, BF16, 64).startswith("memory-efficient")  # a training step
    assert kernels.describe_attention("sdpa-efficient", cpu, BF16, 64).startswith("memory-efficient")
    assert kernels.describe_attention("flash-attn", cpu, BF16, 64).startswith("FlashAttention-2 (Dao-AILab")
    monkeypatch.setattr(kernels, "device_kind", lambda device: H100)
    monkeypatch.setattr(kernels, "flash_attn_packages", lambda: FA2_FA3)
    assert kernels.describe_attention("flash-attn", cpu, BF16, 64).startswith("FlashAttention-3 (Dao-AILab")


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


@pytest.fixture
def fresh_ranking():
    from dinokit.models import kernels

    kernels._working.cache_clear(), kernels._ranked.cache_clear()
    yield kernels
    kernels._working.cache_clear(), kernels._ranked.cache_clear()


def test_the_probe_never_times_on_the_cpu(fresh_ranking, monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = fresh_ranking
    monkeypatch.setattr(kernels, "sdpa_candidates", lambda kind, dtype, head_dim: ["flash", "math"])
    monkeypatch.setattr(kernels, "_timings", lambda *args: pytest.fail("timed a kernel on the CPU"))
    for backward in (True, False):  # both run; our order kept
        assert kernels._ranked(torch.device("cpu"), FP32, 16, backward) == ("flash", "math")


def test_a_kernel_this_build_refuses_is_dropped_with_a_warning(fresh_ranking, monkeypatch, caplog) -> None:
    """The CPU has no memory-efficient or cuDNN kernel: a real refusal, answered by the next candidate."""
    kernels = fresh_ranking
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "sdpa_candidates", lambda kind, dtype, head_dim: ["efficient", "flash"])
    assert kernels._ranked(cpu, FP32, 16, True) == ("flash",)
    assert "SDPA efficient kernel unavailable" in caplog.text and "using flash" in caplog.text
    monkeypatch.setattr(kernels, "sdpa_candidates", lambda kind, dtype, head_dim: ["cudnn"])
    assert kernels._ranked(cpu, BF16, 16, True) == ("math",)
    assert "no SDPA cudnn kernel runs" in caplog.text


def test_the_sdpa_context_takes_fewer_queries_than_keys() -> None:
    """The training's last block: a gathered query subset against all keys, checked against the softmax."""
    from dinokit.models.kernels import sdpa_context

    qkv = torch.randn(2, 21, 3, 3, 16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    few = q[:, :, [0, 4, 7]].contiguous()
    with sdpa_context(few):
        out = torch.nn.functional.scaled_dot_product_attention(few, k, v)
    ref = (few @ k.transpose(-2, -1) * 16**-0.5).softmax(-1) @ v
    assert out.shape == (2, 3, 3, 16) and torch.allclose(out, ref, atol=1e-5)


def test_the_kernel_follows_whether_a_backward_will_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference and the EMA teacher get the fastest forward; the student the fastest forward + backward."""
    from dinokit.models import kernels

    monkeypatch.setattr(kernels, "_ranked", lambda device, dtype, head_dim, grad: ("flash",) if grad else ("math",))
    q = torch.randn(1, 2, 5, 16)
    assert kernels.sdpa_kernel_for(q) == "math" and kernels.sdpa_kernel_for(q.requires_grad_()) == "flash"


def test_the_speed_study_imports_and_measures_without_resource(monkeypatch) -> None:
    """Native Windows has no ``resource`` module: notebook 05 must still import dinokit.bench."""
    import ast
    import builtins

    import dinokit.bench
    import dinokit.device

    for module in (dinokit.bench, dinokit.device):  # no module-level import of resource
        tree = ast.parse(Path(module.__file__).read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not any(a.name == "resource" for n in top for a in n.names), module.__name__
    real = builtins.__import__

    def no_resource(name, *args, **kwargs):
        if name == "resource":
            raise ImportError("No module named 'resource'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_resource)
    monkeypatch.setattr(dinokit.device.Path, "read_text", lambda self: (_ for _ in ()).throw(OSError()))
    assert dinokit.bench._minor_faults() == 0 and dinokit.device.peak_memory_mb("cpu") == 0.0

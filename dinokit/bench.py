"""``dinokit bench``: FlashAttention on vs off, for inference and training, across sizes.

For each configuration (patch size, image size, batch) and attention backend it measures:

* ``inference``: feature extraction (no grad) images/s and latency;
* ``backbone``: a bare backbone forward + backward;
* ``train_step``: the full DINOv2 step (student + teacher, heads, losses, backward, AdamW, EMA).

Every configuration is first checked for correctness (each backend's output against ``naive``),
timed after warm-up as the median of repeats (CUDA events around synchronised regions on a GPU),
and an out-of-memory is recorded as ``status="oom"``, not a crash. On the CPU each measurement
runs in a fresh process (see ``measure_in_fresh_process``). Peak memory is CUDA's max allocated
on a GPU and the measuring process's peak resident set on the CPU (it includes Python, torch and
the model, so the on/off ratio understates the saving).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dinokit.config import make_config
from dinokit.data.synthetic_batch import synthetic_batch
from dinokit.device import device_kind, device_name, peak_memory_mb, resolve_device
from dinokit.losses.objective import DINOv2Objective
from dinokit.models.attention import BACKENDS, flash_attn_available
from dinokit.models.kernels import describe_attention, flash_attn_problem
from dinokit.models.lean_branch import lean_branches_pay, set_lean_branches
from dinokit.models.ssl import build_ssl_model
from dinokit.models.vit import build_vit
from dinokit.precision import choose_precision, grad_scaler
from dinokit.train.optimizer import build_optimizer
from dinokit.train.step import train_step
from dinokit.train.teacher import build_teacher

MODES = ("inference", "backbone", "train_step")
# The schedule values a timed training step runs with (mid-run values; speed does not depend on them).
STEP_SCHEDULE = {"lr": 1e-4, "wd": 0.04, "last_layer_lr": 1e-4, "momentum": 0.996, "teacher_temp": 0.04}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _head_dim(arch: str) -> int:
    from dinokit.models.vit import ARCHS

    dim, _, heads = ARCHS[arch]
    return dim // heads


@dataclass
class BenchCase:
    arch: str = "vit_small"
    patch: int = 8
    img_size: int = 224
    batch: int = 8
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast) | auto (what training would pick on the device)
    modes: tuple[str, ...] = MODES
    local_size: int = 0  # train_step: local crop size (0: img_size * 96 / 224)
    n_local: int = 2
    drop_path: float = 0.0  # training modes: stochastic depth rate
    efficient_drop_path: bool = True  # DINOv2's subset trick vs timm's DropPath


@dataclass
class BenchRecord:
    backend: str
    mode: str
    arch: str
    patch: int
    img_size: int
    tokens: int
    batch: int
    dtype: str
    device: str
    torch: str
    images_per_s: float = 0.0
    latency_ms: float = 0.0
    peak_mem_mb: float = 0.0
    status: str = "ok"
    max_abs_diff: float = 0.0
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, list[BenchCase]] = {
    # Inside `make demo` (about a minute on 2 cores): FlashAttention on vs off for ViT-S/8 inference
    # at 224 px (785 tokens, where it matters) and a training step (forward + backward) at 96 px.
    "cpu-demo": [
        BenchCase("vit_small", 8, 224, 8, "fp32", modes=("inference",)),
        BenchCase("vit_small", 8, 96, 8, "fp32", modes=("backbone",)),
    ],
    # Minutes on 2 CPU cores: the assignment's ViT-S/8 at 224 (inference + backbone training) at
    # batch 8, plus a small image size where attention matters less. cpu-full adds batch 32.
    "cpu-quick": [
        BenchCase("vit_small", 8, 96, 8, "fp32"),
        BenchCase("vit_small", 8, 224, 8, "fp32", modes=("inference", "backbone")),
    ],
    "cpu-full": [
        BenchCase("vit_small", 16, 224, 8, "fp32"),
        BenchCase("vit_small", 8, 96, 8, "fp32"),
        BenchCase("vit_small", 8, 224, 8, "fp32"),
        BenchCase("vit_small", 8, 224, 32, "fp32", modes=("inference",)),
        BenchCase("vit_small", 8, 224, 8, "bf16", modes=("inference",)),
    ],
    # One GPU (sized for an H100; a 16 GB card records out-of-memory rows): ViT-S/8 at 224, and larger
    # images where attention dominates, in the precision training picks there (bf16 sm80+, else fp16).
    "gpu": [
        BenchCase("vit_small", 16, 224, 128, "auto"),
        BenchCase("vit_small", 8, 96, 128, "auto"),
        BenchCase("vit_small", 8, 224, 128, "auto", n_local=8),
        BenchCase("vit_small", 8, 448, 32, "auto", modes=("inference", "backbone")),
        BenchCase("vit_small", 14, 518, 64, "auto", modes=("inference", "backbone")),
        BenchCase("vit_small", 8, 224, 64, "fp32", modes=("inference",)),
    ],
}


def available_backends(device: torch.device) -> list[str]:
    """naive (off), sdpa (on: the best kernel this device has), and on CUDA the efficient kernel and
    the flash-attn package where they can run."""
    out = ["naive", "sdpa"]
    if device.type == "cuda":
        out.append("sdpa-efficient")
        if flash_attn_available() and flash_attn_problem(device_kind(device)) is None:
            out.append("flash-attn")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak for the next measurement, so each backend gets its own figure.

    On the CPU this resets the process's resident-set high-water mark (Linux >= 4.0 honours
    ``5`` written to ``/proc/self/clear_refs``); elsewhere the CPU peak stays monotonic.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed heap mapped: hand it back
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _minor_faults() -> int:
    """Pages the kernel had to map in (and zero) for this process so far: the CPU cost of fresh buffers.
    0 where there is no ``resource`` module (native Windows): the column then reads 0."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _autocast(dtype: str, device: torch.device):
    if dtype == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def _check(case: BenchCase, backends: list[str], device: torch.device) -> dict[str, float]:
    """Max |difference| of each backend's features against ``naive`` on a small batch."""
    torch.manual_seed(0)
    model = build_vit(case.arch, patch_size=case.patch, img_size=case.img_size).to(device).eval()
    x = torch.randn(2, 3, case.img_size, case.img_size, device=device)
    out = {}
    with torch.no_grad(), _autocast(case.dtype, device):
        model.set_attention_backend("naive")
        ref = model(x).float()
        for backend in backends:
            model.set_attention_backend(backend)
            out[backend] = float((model(x).float() - ref).abs().max())
    return out


def _runner(case: BenchCase, mode: str, backend: str, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    if mode in ("inference", "backbone"):
        model = build_vit(
            case.arch, patch_size=case.patch, img_size=case.img_size, attention=backend,
            drop_path=case.drop_path, efficient_drop_path=case.efficient_drop_path,
        ).to(device)  # fmt: skip
        x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device)
        if mode == "inference":
            model.eval()

            def run() -> None:
                with torch.no_grad(), _autocast(case.dtype, device):
                    model(x)

            return run
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            with _autocast(case.dtype, device):
                loss = model.forward_features(x)["patch"].float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run
    local = case.local_size or max(case.patch, round(case.img_size * 96 / 224 / case.patch) * case.patch)
    cfg = make_config(
        "default",
        {
            "model.arch": case.arch, "model.patch_size": case.patch, "model.attention": backend,
            "crops.global_size": case.img_size, "crops.local_size": local, "crops.n_local": case.n_local,
            "model.drop_path": case.drop_path, "model.efficient_drop_path": case.efficient_drop_path,
        },
    )  # fmt: skip
    student = build_ssl_model(cfg.model, case.img_size).to(device)
    set_lean_branches(student.backbone, lean_branches_pay(device.type))  # as training does there
    teacher = build_teacher(student)
    objective = DINOv2Objective(cfg.loss, cfg.model.head_prototypes).to(device)
    optimizer = build_optimizer(student, device)
    scaler = grad_scaler(case.dtype, device)
    # on the device once, as a loader's pinned batch would be: the step times the model, not copies
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_batch(cfg, case.batch).items()}

    def run() -> None:
        train_step(student, teacher, objective, optimizer, scaler, batch, STEP_SCHEDULE, case.dtype, device, 3.0)

    return run


def _timm_runner(case: BenchCase, device: torch.device) -> Callable[[], None]:
    """timm's own ViT with its fused attention, same size and input: the bar for ``sdpa`` inference."""
    import timm

    from dinokit.models.vit import ARCHS

    d, depth, heads = ARCHS[case.arch]
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=case.img_size, patch_size=case.patch,
        embed_dim=d, depth=depth, num_heads=heads,
    ).to(device).eval()  # fmt: skip
    x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device)

    def run() -> None:
        with torch.no_grad(), _autocast(case.dtype, device):
            model(x)

    return run


def measure(
    case: BenchCase, mode: str, backend: str, device: str | torch.device, warmup: int, repeats: int, threads: int = 0
) -> dict:
    """Time one (case, mode, backend) in this process: speed, peak memory, page faults, status.

    ``device`` may be a string so that the arguments pickle cheaply into a fresh process.
    """
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    out: dict = {"status": "ok"}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak_memory(device)
        run = _timm_runner(case, device) if backend == "timm-fused" else _runner(case, mode, backend, device)
        faults = _minor_faults()
        median = statistics.median(_time(run, device, warmup, repeats))
        out.update(latency_ms=1000 * median, images_per_s=case.batch / median, peak_mem_mb=peak_memory_mb(device))
        if device.type == "cpu":
            out["page_faults_per_image"] = round((_minor_faults() - faults) / (case.batch * (warmup + repeats)))
    except torch.OutOfMemoryError:
        out["status"] = "oom"
    except RuntimeError as exc:  # e.g. no kernel for this dtype / device
        out["status"] = f"error: {str(exc).splitlines()[0][:120]}"
    return out


def measure_in_fresh_process(*args) -> dict:
    """``measure`` in a new Python process, so no measurement inherits another's heap.

    On the CPU the naive path's speed hangs on whether its N x N buffers come back from the
    allocator already mapped or must be faulted in again: measured after other work in one
    process, ViT-S/8@224 naive inference took ~7,000 page faults per image and ran as fast as
    flash; in a fresh process ~110,000 and 1.4-1.6x slower. A fresh process per measurement is
    what a user's own inference or training job sees, and makes each peak RSS its own.
    """
    return run_in_fresh_process(measure, *args)


def run_in_fresh_process(fn: Callable[..., dict], *args) -> dict:
    """``fn(*args)`` (a top-level function returning a dict) in a new spawned Python process;
    a process killed on the way (out of memory) gives a status instead of an exception."""
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(fn, *args).result()
    except BrokenProcessPool:
        return {"status": "killed (out of memory?)"}


def run_bench(
    cases: Iterable[BenchCase],
    backends: list[str] | None = None,
    device: str | torch.device | None = None,
    warmup: int = 1,
    repeats: int = 3,
    progress: bool = True,
    timm_ref: bool = True,
    isolate: bool | None = None,
) -> list[BenchRecord]:
    """Check, then time every (case, mode, backend); ``isolate`` (default: on the CPU) runs each
    measurement in a fresh process (see ``measure_in_fresh_process``)."""
    device = resolve_device(device or "auto")
    backends = backends or available_backends(device)
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; choose from {BACKENDS}")
    isolate = device.type == "cpu" if isolate is None else isolate
    machine = device_name(device)
    records: list[BenchRecord] = []
    cases = list(cases)
    total = sum(len(c.modes) * len(backends) + (timm_ref and "inference" in c.modes) for c in cases)
    bar = tqdm(total=total, desc="speed study", disable=not progress)
    auto = choose_precision("auto", device_kind(device))
    for case in cases:
        if case.dtype == "auto":  # bf16 on sm80+ GPUs, fp16 below; as pre-training would choose
            case = dataclasses.replace(case, dtype=auto)
        tokens = (case.img_size // case.patch) ** 2 + 1
        diffs = _check(case, backends, device)
        tolerance = 1e-3 if case.dtype == "fp32" else 5e-2
        for mode in case.modes:
            timm = ["timm-fused"] if mode == "inference" and timm_ref else []
            for backend in backends + timm:
                rec = BenchRecord(
                    backend, mode, case.arch, case.patch, case.img_size, tokens, case.batch, case.dtype,
                    machine, torch.__version__, max_abs_diff=diffs.get(backend, 0.0),
                )  # fmt: skip
                head_dim, backward = _head_dim(case.arch), mode != "inference"  # the kernel ranking differs
                rec.extra["attention_kernel"] = (
                    "timm fused attention (SDPA, PyTorch's choice)" if backend == "timm-fused"
                    else describe_attention(backend, device, _DTYPES[case.dtype], head_dim, backward=backward)
                )  # fmt: skip
                if rec.max_abs_diff > tolerance * 10:
                    rec.status = "mismatch"
                else:
                    args = (case, mode, backend, str(device), warmup, repeats, torch.get_num_threads())
                    result = measure_in_fresh_process(*args) if isolate else measure(*args)
                    rec.status = result.pop("status")
                    rec.latency_ms = result.pop("latency_ms", 0.0)
                    rec.images_per_s = result.pop("images_per_s", 0.0)
                    rec.peak_mem_mb = result.pop("peak_mem_mb", 0.0)
                    rec.extra.update(result)
                    rec.extra["isolated"] = isolate
                records.append(rec)
                bar.update()
    bar.close()
    return records


def speedups(records: list[BenchRecord], baseline: str = "naive") -> list[dict]:
    """One row per (mode, config, backend): images/s and the ratio to the baseline backend."""
    key = lambda r: (r.mode, r.arch, r.patch, r.img_size, r.batch, r.dtype)  # noqa: E731
    base = {key(r): r for r in records if r.backend == baseline and r.status == "ok"}
    rows = []
    for r in records:
        b = base.get(key(r))
        rows.append(
            {
                **asdict(r),
                "speedup": r.images_per_s / b.images_per_s if b and r.status == "ok" else None,
                "memory_ratio": r.peak_mem_mb / b.peak_mem_mb if b and r.status == "ok" and b.peak_mem_mb else None,
            }
        )
    return rows


def format_table(records: list[BenchRecord]) -> str:
    lines = [
        f"{'mode':<11}{'model':<14}{'img':>5}{'tok':>6}{'bs':>5}{'dtype':>6}  {'backend':<15}"
        f"{'img/s':>9}{'ms':>9}{'speed-up':>9}{'mem MB':>9}{'faults/img':>11}  status"
    ]
    for row in speedups(records):
        model = f"{row['arch'].replace('vit_', 'ViT-')}/{row['patch']}"
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        faults = row["extra"].get("page_faults_per_image")
        faults = "-" if faults is None else f"{faults:,}"
        lines.append(
            f"{row['mode']:<11}{model:<14}{row['img_size']:>5}{row['tokens']:>6}{row['batch']:>5}{row['dtype']:>6}  "
            f"{row['backend']:<15}{row['images_per_s']:>9.2f}{row['latency_ms']:>9.1f}{speed:>9}"
            f"{row['peak_mem_mb']:>9.0f}{faults:>11}  {row['status']}"
        )
    return "\n".join(lines)


def save_records(records: list[BenchRecord], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(speedups(records), indent=1) + "\n")
    return path


def load_records(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from dinokit.models.attention import _sdpa_context

    with _sdpa_context("sdpa", q):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def attention_op_sweep(
    token_counts: Iterable[int] = (145, 785, 1601, 3137),
    heads: int = 6,
    head_dim: int = 64,
    batch: int = 1,
    backward: bool = False,
    device: str | torch.device | None = None,
    repeats: int = 3,
) -> list[dict]:
    """The attention operation alone (no projections): naive softmax(QK^T)V vs SDPA's flash kernel.

    Token counts default to ViT-S/8 at 96, 224, 320 and 448 px (+ CLS). This is where the N x N
    matrix lives, so it shows the kernel's effect without the MLPs that dilute it in a full model.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for n in token_counts:
        q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, requires_grad=backward) for _ in range(3))

        naive = partial(_naive_attention, q, k, v)
        flash = partial(_flash_attention, q, k, v)

        row = {"tokens": n, "heads": heads, "head_dim": head_dim, "batch": batch, "backward": backward}
        with torch.no_grad():
            row["max_abs_diff"] = float((naive() - flash()).abs().max())
        for name, fn in (("naive", naive), ("sdpa", flash)):

            def run(fn=fn) -> None:
                out = fn()
                if backward:
                    out.sum().backward()

            if backward:
                times = _time(run, device, 1, repeats)
            else:
                with torch.no_grad():
                    times = _time(run, device, 1, repeats)
            row[f"{name}_ms"] = 1000 * statistics.median(times)
        row["speedup"] = row["naive_ms"] / row["sdpa_ms"]
        row["attention_matrix_mb"] = batch * heads * n * n * 4 / 2**20
        rows.append(row)
    return rows

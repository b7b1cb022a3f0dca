"""Where one training step's time and memory go, phase by phase, on any device.

    python benchmarks/step_breakdown.py --preset har-vits8 --peak-tflops 790        # a GPU (H200 bf16)
    python benchmarks/step_breakdown.py --tiny --device cpu                         # in make test
    python benchmarks/step_breakdown.py --preset har-vits8 --trace trace.json      # + profiler trace

Phases (each between two device syncs, so their sum exceeds the real step, which overlaps them):
data and augmentation (loader + device crops), teacher forward, student forward (backbone and
head MLPs), heads and losses (prototype logits, targets, cross-entropies), backward, clipping,
optimizer, EMA. Then the real step rate with no syncs between steps (images/s), FLOPs per source
image (``torch.utils.flop_counter``) and MFU against ``--peak-tflops``, host syncs per step
(:mod:`dinokit.train.proxies`), saved-for-backward bytes per image, and the peak memory.
Writes ``report/bench/step-breakdown-<device>-<attention>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dinokit.bench import STEP_SCHEDULE  # noqa: E402
from dinokit.config import make_config  # noqa: E402
from dinokit.data.synth import ensure_embedded  # noqa: E402
from dinokit.device import device_kind, device_name, peak_memory_mb, resolve_device, synchronize  # noqa: E402
from dinokit.models.lean_branch import set_lean_branches  # noqa: E402
from dinokit.precision import autocast, choose_precision  # noqa: E402
from dinokit.train.dist import DistInfo  # noqa: E402
from dinokit.train.param_groups import apply_schedules  # noqa: E402
from dinokit.train.proxies import count_syncs, saved_bytes  # noqa: E402
from dinokit.train.setup import build_data, build_parts  # noqa: E402
from dinokit.train.step import MASK_KEYS, clipped_modules, train_step  # noqa: E402
from dinokit.train.teacher import ema_update  # noqa: E402

TINY = ["crops.global_size=32", "crops.local_size=16", "optim.batch_size=8", "crops.eval_size=32"]


class PhaseTimer:
    """Seconds per named phase, each closed by a device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds.setdefault(name, []).append(time.perf_counter() - start)


def next_batch(data, batches, device: torch.device) -> dict:
    batch = next(batches)
    if data.batch_crops is not None:
        batch.update(data.batch_crops.on_device(batch, device))
    return batch


def timed_step(parts, data, batches, timer: PhaseTimer, precision: str, device: torch.device) -> None:
    """``train_step`` cut at its phase boundaries (same calls, same order)."""
    with timer("data and augmentation"):
        batch = next_batch(data, batches, device)
        g = batch["global"].to(device, non_blocking=True)
        loc = batch["local"].to(device, non_blocking=True) if "local" in batch else None
        masks, order, rows, weights = (batch[k].to(device, non_blocking=True) for k in MASK_KEYS)
    apply_schedules(parts.optimizer, STEP_SCHEDULE["lr"], STEP_SCHEDULE["wd"], STEP_SCHEDULE["last_layer_lr"])
    with autocast(precision, device):
        with timer("teacher forward"), torch.no_grad():
            t_out = parts.teacher(g, masks=masks, mask_input=False, order=order, rows=rows)
        with timer("student forward"):
            s_out = parts.model(g, loc, masks, order=order, rows=rows)
        with timer("heads and losses"):
            loss, _ = parts.objective(s_out, t_out, weights, STEP_SCHEDULE["teacher_temp"])
    with timer("backward"):
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
    with timer("clipping"):
        parts.scaler.unscale_(parts.optimizer)
        for module in clipped_modules(parts.student).values():
            nn.utils.clip_grad_norm_(module.parameters(), 3.0, foreach=True)
    with timer("optimizer"):
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    with timer("EMA"):
        ema_update(parts.teacher, parts.student, STEP_SCHEDULE["momentum"])


def run_step(parts, data, batches, precision: str, device: torch.device) -> None:
    batch = next_batch(data, batches, device)
    train_step(parts.model, parts.teacher, parts.objective, parts.optimizer, parts.scaler, batch, STEP_SCHEDULE,
               precision, device, 3.0)  # fmt: skip


def forward_and_loss(parts, batch: dict, precision: str, device: torch.device) -> None:
    g, loc = batch["global"].to(device), batch.get("local")
    loc = loc.to(device) if loc is not None else None
    masks, order, rows, weights = (batch[k].to(device) for k in MASK_KEYS)
    with autocast(precision, device):
        with torch.no_grad():
            t_out = parts.teacher(g, masks=masks, mask_input=False, order=order, rows=rows)
        s_out = parts.model(g, loc, masks, order=order, rows=rows)
        loss, _ = parts.objective(s_out, t_out, weights, STEP_SCHEDULE["teacher_temp"])
    loss.backward()


def setup(args, attention: str, device: torch.device, data_root: Path):
    """``(cfg, precision, data, batches, parts)``: the preset's loader and networks, as a run builds them."""
    overrides = [f"data.root={data_root}", f"model.attention={attention}", f"data.num_workers={args.workers}"]
    overrides += (TINY if args.tiny else []) + (["optim.batch_size=" + str(args.batch)] if args.batch else [])
    overrides += [f"train.compile={args.compile}"]
    cfg = make_config(args.preset, overrides)
    precision = choose_precision(cfg.train.precision, device_kind(device))
    torch.manual_seed(0)
    data = build_data(cfg, DistInfo(device=device), device)
    data.sampler.set_range(0, 1 << 30)  # as many batches as asked: the run's own sequence
    parts = build_parts(cfg, device, precision, resume=False, world=1)
    if args.lean != "auto":  # e.g. "on" on the CPU: the blocks as a GPU runs them
        set_lean_branches(parts.student.backbone, args.lean == "on")
    return cfg, precision, data, iter(data.loader), parts


def measure(args, attention: str, device: torch.device, data_root: Path) -> dict:
    cfg, precision, data, batches, parts = setup(args, attention, device, data_root)
    for _ in range(args.warmup):
        run_step(parts, data, batches, precision, device)
    timer = PhaseTimer(device)
    for _ in range(args.steps):
        timed_step(parts, data, batches, timer, precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        run_step(parts, data, batches, precision, device)
    synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps
    b = cfg.optim.batch_size
    raw = next(batches)
    augment = count_syncs(lambda: data.batch_crops.on_device(raw, device)) if data.batch_crops else {}
    sample = next_batch(data, batches, device)
    syncs = count_syncs(lambda: train_step(parts.model, parts.teacher, parts.objective, parts.optimizer,
                                           parts.scaler, sample, STEP_SCHEDULE, precision, device, 3.0))  # fmt: skip
    with FlopCounterMode(display=False) as flops:
        train_step(parts.model, parts.teacher, parts.objective, parts.optimizer, parts.scaler, sample, STEP_SCHEDULE,
                   precision, device, 3.0)  # fmt: skip
    saved = saved_bytes(lambda: forward_and_loss(parts, sample, precision, device))
    flops_per_image = flops.get_total_flops() / b
    out = {
        "preset": args.preset, "attention": attention, "precision": precision, "batch": b,
        "compile": args.compile, "lean_branches": parts.student.backbone.blocks[0].lean,
        "device": device_name(device), "torch": torch.__version__,
        "images_per_s": b / step_s, "step_ms": step_s * 1000,
        "phases_ms": {k: 1000 * statistics.median(v) for k, v in timer.seconds.items()},
        "gflop_per_image": flops_per_image / 1e9,
        "syncs_per_step": sum(syncs.values()), "syncs": dict(syncs),
        "augmentation_syncs": sum(augment.values()), "augmentation_sync_ops": dict(augment),
        "saved_mb_per_image": saved / b / 2**20, "peak_mem_mb": peak_memory_mb(device),
    }  # fmt: skip
    if args.peak_tflops:
        out["mfu"] = flops_per_image * out["images_per_s"] / (args.peak_tflops * 1e12)
    return out


def show(r: dict) -> str:
    lines = [f"{r['preset']} {r['attention']} {r['precision']} batch {r['batch']} on {r['device']}:"]
    lines.append(f"  step {r['step_ms']:.1f} ms = {r['images_per_s']:.1f} img/s; {r['gflop_per_image']:.1f} GFLOP/img"
                 + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))  # fmt: skip
    lines.append(f"  host syncs: step {r['syncs_per_step']} {r['syncs'] or ''}, augmentation "
                 f"{r['augmentation_syncs']}; saved for backward "
                 f"{r['saved_mb_per_image']:.1f} MB/img; peak {r['peak_mem_mb']:,.0f} MB")  # fmt: skip
    total = sum(r["phases_ms"].values())
    for name, ms in r["phases_ms"].items():
        lines.append(f"  {name:<22} {ms:8.1f} ms  {ms / total:6.1%}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="har-vits8")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention", nargs="+", default=["sdpa", "naive"])
    parser.add_argument("--batch", type=int, default=0, help="0: the preset's")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--lean", choices=["auto", "on", "off"], default="auto",
                        help="memory-lean block branches; auto: as training picks for the device")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense matmul peak, for MFU")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the ci preset (runs in make test)")
    parser.add_argument("--trace", type=Path, help="also a torch.profiler Chrome trace of 3 steps (first attention)")
    parser.add_argument("--out", type=Path, default=ROOT / "report" / "bench")
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.steps, args.warmup, args.workers = "ci", 2, 1, 0
    device = resolve_device(args.device)
    px = 32 if args.tiny else 224
    work = Path(tempfile.mkdtemp(prefix="dinokit-breakdown-"))
    data_root = ensure_embedded(work / f"embedded-{px}px", 8 if args.tiny else 40, px)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for attention in args.attention:
        r = measure(args, attention, device, data_root)
        results.append(r)
        print(show(r), flush=True)
        tag = r["device"].split(" (")[0].replace(" ", "-")
        path = args.out / f"step-breakdown-{tag}-{args.preset}-{attention}{'-compile' if args.compile else ''}.json"
        path.write_text(json.dumps(r, indent=1) + "\n")
    if len(results) == 2:
        print(f"on/off: {results[0]['images_per_s'] / results[1]['images_per_s']:.2f}x", flush=True)
    if args.trace:
        _trace(args, device, data_root)
    return 0


def _trace(args, device: torch.device, data_root: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    _, precision, data, batches, parts = setup(args, args.attention[0], device, data_root)  # the first measured
    run_step(parts, data, batches, precision, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            run_step(parts, data, batches, precision, device)
        synchronize(device)
    prof.export_chrome_trace(str(args.trace))
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                    row_limit=25))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

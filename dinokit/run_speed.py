"""The assignment's speed study: FlashAttention on vs off for *this run's own* recipe.

The generic sweep (:mod:`dinokit.bench`) times fixed shapes. The assignment asks for the speed of
the student's training and testing, so this measures exactly that, both ways, all else equal:

* **training**: ``iters`` steps (after ``warmup``) of the run's config (preset, batch, crops,
  precision, compile, checkpointing, loader and augmentation included), attention on, then off;
* **testing**: one pass of the frozen teacher over the held-out and unlabelled test images, with
  the loader (decode + resize) and with the model alone on images already decoded.

Every measurement runs in a fresh process (its own heap and peak memory), and rounds alternate
the order (on/off, then off/on). Writes ``report/bench/assignment-<run>.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from dinokit import paths, runs
from dinokit.bench import STEP_SCHEDULE, reset_peak_memory, run_in_fresh_process
from dinokit.device import device_kind, device_name, peak_memory_mb, resolve_device, synchronize
from dinokit.models.kernels import describe_attention
from dinokit.precision import DTYPES, choose_precision

ON, OFF = "sdpa", "naive"  # FlashAttention on (the fastest fused kernel the device has) / off (explicit softmax)


def bench_path(run_dir: str | Path) -> Path:
    return paths.report_dir() / "bench" / f"assignment-{Path(run_dir).name}.json"


def _reset_peak(device: torch.device) -> None:
    """A fresh peak for the next measurement (CUDA's allocator; on Linux the process's resident-set mark)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)


def train_speed(run_dir: Path, attention: str, iters: int, warmup: int, device: torch.device) -> dict:
    """Images/s of the run's own training step (data included) with ``attention``; weights are fresh."""
    from dinokit.train.dist import DistInfo
    from dinokit.train.setup import build_data, build_parts
    from dinokit.train.step import train_step

    cfg = runs.run_config(run_dir)
    cfg.model.attention = attention
    precision = choose_precision(cfg.train.precision, device_kind(device))
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg, DistInfo(device=device), device)
    data.sampler.set_range(0, warmup + iters)
    parts = build_parts(cfg, device, precision, resume=True, world=1)  # the bare architecture: no download
    batches = iter(data.loader)

    def step() -> None:
        batch = next(batches)
        if data.batch_crops is not None:
            batch.update(data.batch_crops.on_device(batch, device))
        train_step(parts.model, parts.teacher, parts.objective, parts.optimizer, parts.scaler, batch, STEP_SCHEDULE,
                   precision, device, cfg.optim.clip_grad)  # fmt: skip

    for _ in range(warmup):
        step()
    synchronize(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    dtype = DTYPES[precision]
    head_dim = parts.student.backbone.embed_dim // parts.student.backbone.num_heads
    return {
        "images_per_s": iters * cfg.optim.batch_size / seconds,
        "step_ms": 1000 * seconds / iters,
        "peak_mem_mb": peak_memory_mb(device),
        "kernel": describe_attention(attention, device, dtype, head_dim, backward=True),
        "precision": precision,
        "batch": cfg.optim.batch_size,
        "iterations": iters,
    }


def test_speed(run_dir: Path, attention: str, device: torch.device) -> dict:
    """One pass of the frozen teacher over the held-out and test images: with the loader, and model alone."""
    from dinokit.data.source import prepare_split
    from dinokit.eval.eval_images import default_batch_size, normalize
    from dinokit.eval.features import decoded_batches, extract_features, features_of
    from dinokit.precision import autocast

    cfg = runs.run_config(run_dir)
    precision = choose_precision("auto", device_kind(device))
    split = prepare_split(cfg, progress=False)
    records = split.val + split.unlabeled
    size = cfg.crops.eval_size
    backbone = runs.load_backbone(run_dir).set_attention_backend(attention).to(device).eval()
    batch = default_batch_size(device)
    with torch.no_grad(), autocast(precision, device):  # warm-up: kernel selection, allocator, threads
        features_of(backbone, torch.zeros(min(batch, 8), 3, size, size, device=device))
    synchronize(device)
    _reset_peak(device)
    start = time.perf_counter()
    n = len(extract_features(backbone, records, size, device=device, precision=precision, progress=False,
                             cache=False)["indices"])  # fmt: skip
    with_loader = time.perf_counter() - start
    peak = peak_memory_mb(device)
    # the same pass on images decoded beforehand (uint8, on the host, as the eval cache holds them)
    decoded = [images for images, _, _ in decoded_batches(records, size, batch, 0, cache=False) if images is not None]
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast(precision, device):
        for images in decoded:  # the forward extract_features runs (CLS features: a CLS-only last block)
            features_of(backbone, normalize(images.to(device, non_blocking=True)))
    synchronize(device)
    alone = time.perf_counter() - start
    dtype = DTYPES[precision]
    head_dim = backbone.embed_dim // backbone.num_heads
    return {
        "images": n,
        "images_per_s": n / with_loader,
        "model_alone_images_per_s": n / alone,
        "peak_mem_mb": peak,  # of the pass with the loader
        "kernel": describe_attention(attention, device, dtype, head_dim, backward=False),
        "precision": precision,
        "image_size": size,
    }


def _measure(kind: str, run_dir: str, attention: str, iters: int, warmup: int, device: str, threads: int) -> dict:
    """One measurement; top-level so that a fresh process can run it."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    try:
        if kind == "train":
            return {"status": "ok", **train_speed(Path(run_dir), attention, iters, warmup, device)}
        return {"status": "ok", **test_speed(Path(run_dir), attention, device)}
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except RuntimeError as exc:  # e.g. no kernel for this device and dtype: recorded, the pipeline goes on
        return {"status": f"error: {str(exc).splitlines()[0][:120]}"}


def _summary(samples: list[dict], field: str) -> dict:
    values = [s[field] for s in samples if s.get("status") == "ok"]
    if not values:
        return {}
    return {field: statistics.median(values), f"{field}_range": [min(values), max(values)]}


def _combine(samples: list[dict]) -> dict:
    """Median and range over rounds for every rate; the rest from the first sample."""
    ok = [s for s in samples if s.get("status") == "ok"]
    if not ok:
        return {"status": samples[0].get("status", "failed")}
    out = {k: v for k, v in ok[0].items() if not k.endswith("per_s")}
    for field in ("images_per_s", "model_alone_images_per_s"):
        if field in ok[0]:
            out.update(_summary(ok, field))
    out["peak_mem_mb"] = max(s["peak_mem_mb"] for s in ok)
    out["rounds"] = len(ok)
    return out


def assignment_speed(
    run_dir: str | Path,
    device: str | torch.device = "auto",
    iters: int = 30,
    warmup: int = 5,
    rounds: int = 1,
    out: str | Path | None = None,
    isolate: bool = True,
) -> Path:
    """Time training and testing of ``run_dir``'s recipe with FlashAttention on and off; write the JSON.

    ``isolate``: each measurement in a fresh process (its own heap and peak memory; on a GPU, none
    of the pipeline's earlier tensors), at the cost of a few seconds of start-up each."""
    if iters < 1 or rounds < 1:
        raise ValueError(f"the speed study needs at least 1 timed step and 1 round (got {iters}, {rounds})")
    run_dir = Path(run_dir)
    device = resolve_device(device)
    measure = partial(run_in_fresh_process, _measure) if isolate else _measure
    samples: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        order = (ON, OFF) if r % 2 == 0 else (OFF, ON)  # alternate, so drift does not favour one side
        for kind in ("train", "test"):
            for attention in order:
                args = (kind, str(run_dir), attention, iters, warmup, str(device), torch.get_num_threads())
                samples.setdefault((kind, attention), []).append(measure(*args))
    result: dict = {
        "run": run_dir.name,
        "preset": runs.run_info(run_dir).get("preset", ""),
        "device": device_name(device),
        "torch": torch.__version__,
        "isolated": isolate,
        "rounds": rounds,
    }
    for kind in ("train", "test"):
        on, off = _combine(samples[(kind, ON)]), _combine(samples[(kind, OFF)])
        row = {"on": on, "off": off}
        if on.get("images_per_s") and off.get("images_per_s"):
            row["speedup"] = on["images_per_s"] / off["images_per_s"]
            row["memory_ratio"] = on["peak_mem_mb"] / off["peak_mem_mb"] if off["peak_mem_mb"] else None
        if on.get("model_alone_images_per_s") and off.get("model_alone_images_per_s"):
            row["model_alone_speedup"] = on["model_alone_images_per_s"] / off["model_alone_images_per_s"]
        result[kind] = row
    path = Path(out) if out else bench_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def format_speed(result: dict) -> str:
    """The two rows the report leads with, as text."""
    lines = [f"{'':<9}{'on img/s':>10}{'off img/s':>11}{'speed-up':>10}{'peak MB on/off':>18}  kernel (on)"]
    for kind, label in (("train", "training"), ("test", "testing")):
        row = result.get(kind, {})
        on, off = row.get("on", {}), row.get("off", {})
        if not (on.get("images_per_s") and off.get("images_per_s")):
            lines.append(f"{label:<9}  {on.get('status', '?')} / {off.get('status', '?')}")
            continue
        lines.append(
            f"{label:<9}{on['images_per_s']:>10.1f}{off['images_per_s']:>11.1f}{row['speedup']:>9.2f}x"
            f"{on['peak_mem_mb']:>9.0f}/{off['peak_mem_mb']:<8.0f}  {on['kernel']}"
        )
        if "model_alone_speedup" in row:
            lines.append(
                f"{'  alone':<9}{on['model_alone_images_per_s']:>10.1f}{off['model_alone_images_per_s']:>11.1f}"
                f"{row['model_alone_speedup']:>9.2f}x"
            )
    return "\n".join(lines)

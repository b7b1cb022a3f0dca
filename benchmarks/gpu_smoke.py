"""The whole GPU path in one go: data, pre-training with FlashAttention on and off, the 16 GB
preset under a 16 GB cap, the step breakdown (FLOPs per image, MFU against the measured matmul
rate, host syncs, saved bytes), evaluation, attention maps, a short speed sweep and the report,
one line per step; non-zero exit on any failure.

Run it the first time a GPU is at hand (about 5 minutes on one GPU):

    bash benchmarks/gpu_smoke.sh                  # the har-vits8 recipe on the embedded data at 224 px
    bash benchmarks/gpu_smoke.sh --tiny --device cpu   # the same steps at toy sizes (in `make test`)

It writes ``report/smoke/gpu-smoke-<device>.json`` (every line's numbers) next to a report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dinokit.bench import BenchCase, run_bench  # noqa: E402
from dinokit.config import make_config  # noqa: E402
from dinokit.data.synth import ensure_embedded  # noqa: E402
from dinokit.device import device_kind, device_name, resolve_device, synchronize  # noqa: E402
from dinokit.eval.run_eval import evaluate_run  # noqa: E402
from dinokit.precision import DTYPES, choose_precision  # noqa: E402
from dinokit.report import build_report  # noqa: E402
from dinokit.runs import read_metrics, run_info  # noqa: E402
from dinokit.train.loop import TrainingOutOfMemory, pretrain  # noqa: E402
from dinokit.viz.attention_run import compute_run_attention  # noqa: E402

# Sizes: the assignment's recipe at full size, and a toy one that runs the same code in seconds.
FULL = {"preset": "har-vits8", "per_class": 40, "px": 224, "iters": 40, "bench": ("vit_small", 8, 224, 64),
        "small_gpu": "har-vits8-16gb"}  # fmt: skip
TINY = {"preset": "ci", "per_class": 8, "px": 32, "iters": 4, "bench": ("vit_pico", 8, 32, 4), "small_gpu": "ci"}
CAP_GB = 16  # a T4 / V100-16GB / P100: what the 16 GB preset must fit


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """The device's dense matmul rate as measured here: the denominator of MFU."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def capped(device: torch.device, gb: float):
    """Run as if the GPU had ``gb`` of memory (torch's per-process fraction); nothing on a CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gb * 2**30 / total)

    @contextlib.contextmanager
    def cap():
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    return cap()


def _train_line(run_dir: Path) -> dict:
    info = run_info(run_dir)
    steps = [m for m in read_metrics(run_dir) if "images_per_s" in m]
    timed = steps[1:] or steps  # the first window holds start-up (cuDNN autotune, worker start)
    return {
        "images_per_s": statistics.median(m["images_per_s"] for m in timed),
        "peak_mem_mb": max(m["peak_mem_mb"] for m in steps),
        "data_wait_share": statistics.median(m["data_wait_share"] for m in timed),
        "attention_kernel": info["attention_kernel"],
        "precision": info["precision"],
        "augment_on": info["augment_on"],
        "grad_checkpointing": info["grad_checkpointing"],
        "loss_dino_last": steps[-1]["loss_dino"],
    }


def _fmt(step: str, d: dict) -> str:
    parts = [
        f"{d['images_per_s']:.0f} img/s",
        f"peak {d['peak_mem_mb']:,.0f} MB",
        f"attention: {d['attention_kernel']}",
    ]
    parts += [d["precision"], f"data wait {d['data_wait_share']:.0%}", f"augment on {d['augment_on']}"]
    if d["grad_checkpointing"]:
        parts.append("activation checkpointing")
    return f"{step}: " + ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the same steps in seconds (CPU check)")
    parser.add_argument("--out", type=Path, default=ROOT / "report" / "smoke", help="where the JSON and report go")
    parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)))
    args = parser.parse_args()
    size = TINY if args.tiny else FULL
    device = resolve_device(args.device)
    name = device_name(device)
    tag = name.split(" (")[0].replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dinokit-smoke-"))
    os.environ.setdefault("DINOKIT_RUNS", str(work / "runs"))
    summary: dict = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "steps": {}}
    failed = False

    def step(label: str, fn) -> object:
        nonlocal failed
        start = time.perf_counter()
        try:
            out = fn()
            summary["steps"][label] = {"status": "ok", "seconds": round(time.perf_counter() - start, 1)}
            return out
        except Exception as exc:  # report every step, then fail at the end
            failed = True
            summary["steps"][label] = {"status": f"FAILED: {type(exc).__name__}: {exc}"[:400]}
            print(f"{label}: FAILED ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
            traceback.print_exc()
            return None

    print(f"dinokit GPU smoke on {name}, torch {torch.__version__}{' (tiny)' if args.tiny else ''}", flush=True)
    data = step(
        "data",
        lambda: ensure_embedded(work / "data" / f"embedded-{size['px']}px", size["per_class"], size["px"]),
    )
    print(f"data: embedded dataset at {size['px']} px in {data}", flush=True)
    base = [
        f"data.root={data}", f"train.max_iters={size['iters']}", "train.knn_every_epochs=100000",
        "train.log_every=5", "train.checkpoint_every=100000", f"data.num_workers={args.workers}",
        f"crops.eval_size={size['px']}",
    ]  # fmt: skip
    runs: dict[str, Path] = {}
    for backend in ("sdpa", "naive"):

        def train(backend: str = backend, checkpointing: bool = False) -> Path:
            overrides = [*base, f"model.attention={backend}", f"train.grad_checkpointing={checkpointing}"]
            out = work / f"run-{backend}{'-ckpt' if checkpointing else ''}"
            try:
                return pretrain(make_config(size["preset"], overrides), out_dir=out, device=device).run_dir
            except TrainingOutOfMemory:
                if checkpointing:
                    raise
                print(f"pretrain {backend}: out of memory at batch 64; again with activation checkpointing")
                torch.cuda.empty_cache()
                return train(backend, checkpointing=True)

        run = step(f"pretrain_{backend}", train)
        if run is not None:
            runs[backend] = run
            line = _train_line(run)
            summary["steps"][f"pretrain_{backend}"].update(line)
            print(_fmt(f"pretrain {size['preset']} {backend} ({size['iters']} it)", line), flush=True)
    if "sdpa" in runs and "naive" in runs:
        a, b = (summary["steps"][f"pretrain_{k}"]["images_per_s"] for k in ("sdpa", "naive"))
        print(f"pretrain speed-up, FlashAttention on vs off: {a / b:.2f}x", flush=True)

    def small_gpu() -> Path:
        out = work / "run-16gb"
        with capped(device, CAP_GB):
            return pretrain(make_config(size["small_gpu"], base), out_dir=out, device=device).run_dir

    run16 = step(f"pretrain_{size['small_gpu']}_capped_{CAP_GB}gb", small_gpu)
    if run16 is not None:
        line = _train_line(run16)
        summary["steps"][f"pretrain_{size['small_gpu']}_capped_{CAP_GB}gb"].update(line)
        print(_fmt(f"pretrain {size['small_gpu']} under a {CAP_GB} GB cap", line), flush=True)
    precision = choose_precision("auto", device_kind(device))
    peak = step("matmul_rate", lambda: matmul_tflops(device, DTYPES[precision], *((256, 3) if args.tiny else ())))
    if peak:
        summary["steps"]["matmul_rate"]["tflops"] = peak
        print(f"matmul rate ({precision}): {peak:.1f} TFLOP/s measured", flush=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_breakdown  # noqa: E402

    for backend in ("sdpa", "naive"):
        bd_args = argparse.Namespace(
            preset=size["preset"], tiny=args.tiny, batch=0, steps=2 if args.tiny else 10, warmup=1 if args.tiny else 3,
            workers=0 if args.tiny else args.workers, compile=False, peak_tflops=peak or 0.0, lean="auto",
        )  # fmt: skip
        record = step(f"breakdown_{backend}", lambda b=backend, a=bd_args: step_breakdown.measure(a, b, device, data))
        if record:
            summary["steps"][f"breakdown_{backend}"].update(record)
            print(step_breakdown.show(record), flush=True)
    run = runs.get("sdpa")
    if run is not None:
        metrics = step("eval", lambda: evaluate_run(run, probe_epochs=20, device=device))
        if metrics:
            summary["steps"]["eval"].update(
                {"knn_top1": metrics["knn"]["top1"], "linear_top1": metrics["linear"]["top1"]}
            )
            print(
                f"eval on {metrics['device']} ({metrics['precision']}): kNN {metrics['knn']['top1']:.1f} %, "
                f"linear {metrics['linear']['top1']:.1f} %, {metrics['seconds']:.0f} s",
                flush=True,
            )
        maps = step("attention", lambda: compute_run_attention(run, n_images=4, device=device))
        if maps:
            print(f"attention maps: {maps}", flush=True)
    arch, patch, px, batch = size["bench"]
    bench_dir = args.out / "bench"
    records = step(
        "bench",
        lambda: run_bench(
            [BenchCase(arch, patch, px, batch, precision, modes=("inference", "backbone"))],
            device=device, warmup=2, repeats=3 if args.tiny else 5, progress=False, isolate=False,
        ),
    )  # fmt: skip
    if records:
        from dinokit.bench import save_records, speedups

        save_records(records, bench_dir / f"gpu-smoke-{tag}{'-tiny' if args.tiny else ''}.json")
        rows = [r for r in speedups(records) if r["backend"] != "naive" and r["speedup"]]
        summary["steps"]["bench"]["rows"] = rows
        for r in rows:
            print(
                f"bench {r['mode']} {r['arch']}/{r['patch']} @{r['img_size']} b{r['batch']} {r['dtype']}: "
                f"{r['backend']} ({r['extra'].get('attention_kernel', '')}) {r['images_per_s']:.0f} img/s, "
                f"{r['speedup']:.2f}x over naive, memory {r['memory_ratio'] or 0:.2f}x",
                flush=True,
            )
    if run is not None:
        report = step("report", lambda: build_report(run, args.out, bench_dir))
        if report:
            print(f"report: {report}", flush=True)
    summary["failed"] = failed
    out = args.out / f"gpu-smoke-{tag}{'-tiny' if args.tiny else ''}.json"
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"{'FAILED' if failed else 'ok'}: {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

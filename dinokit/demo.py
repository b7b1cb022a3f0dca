"""``make demo`` / ``dinokit demo``: the whole story on the embedded dataset, resumable.

Each step is skipped when its result is already on disk, so re-running after an interruption
continues where it stopped: data -> pre-training (the recipe's epochs, fewer if they do not fit a
time budget measured on this machine) -> evaluation (kNN and linear probe of the pre-trained
teacher against a random network of the same shape, raw pixels, and the same network trained with
labels for the same time; does the attention find the figure?) -> speed study (FlashAttention on
vs off) -> attention maps -> report -> video.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dinokit import paths, runs
from dinokit.config import make_config
from dinokit.data.source import prepare_split
from dinokit.device import resolve_device
from dinokit.eval.run_eval import evaluate_run, results_table
from dinokit.train.loop import pretrain

log = logging.getLogger("dinokit.demo")


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_demo(
    preset: str = "cpu-demo",
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    device: str = "auto",
) -> dict:
    device = str(resolve_device(device))  # fail early on a device this machine does not have
    cfg = make_config(preset, overrides)
    run_dir = Path(out_dir) if out_dir else runs.default_run_dir(cfg)
    timings: dict[str, float] = {}
    begin = time.perf_counter()

    start = _step("1/7 data: the embedded dataset and its fixed split")
    split = prepare_split(cfg)
    print(f"{len(split.classes)} classes; {split.summary()}")
    timings["data_s"] = time.perf_counter() - start

    start = _step(f"2/7 pre-training ({preset}) -> {run_dir}")
    done, total = runs.run_progress(run_dir)
    if total and done >= total:
        print(f"already trained ({done}/{total} iterations); delete {run_dir} to retrain")
    else:
        result = pretrain(cfg, out_dir=run_dir, resume=done > 0, device=device)
        if result.status != "finished":
            print(f"pre-training {result.status}; run `make demo` again to resume")
            return {"status": result.status, "run_dir": str(run_dir)}
    budget = runs.run_info(run_dir).get("time_budget")
    if budget:
        print(budget["why"])
    timings["pretrain_s"] = time.perf_counter() - start

    start = _step(
        "3/7 evaluation on the held-out split: pre-trained vs random init, raw pixels, and a supervised "
        "reference trained with labels for the same time"
    )
    metrics = evaluate_run(run_dir, device=device)
    timings["eval_s"] = time.perf_counter() - start
    print(results_table(metrics))
    start = _step("4/7 speed study: FlashAttention on vs off (CPU sweep)")
    bench_json = paths.report_dir() / "bench" / "cpu-demo.json"
    if bench_json.is_file():
        print(f"already measured: {bench_json} (delete it to re-measure)")
    else:
        from dinokit.bench import PRESETS, format_table, run_bench, save_records

        records = run_bench(PRESETS["cpu-demo"], device=device, timm_ref=False, repeats=2)
        print(format_table(records))
        save_records(records, bench_json)
    timings["bench_s"] = time.perf_counter() - start

    start = _step("5/7 attention maps of held-out images, per checkpoint")
    from dinokit.viz.attention_run import compute_run_attention

    print(f"wrote {compute_run_attention(run_dir, device=device)}")
    timings["attention_s"] = time.perf_counter() - start

    start = _step("6/7 report (from saved artifacts)")
    from dinokit.report import build_report

    print(f"wrote {build_report(run_dir)}")
    timings["report_s"] = time.perf_counter() - start

    start = _step("7/7 demo video (from saved artifacts)")
    from dinokit.viz.video import build_video

    print(f"wrote {build_video(run_dir)}")
    timings["video_s"] = time.perf_counter() - start

    timings["total_s"] = time.perf_counter() - begin
    summary = {"status": "finished", "run_dir": str(run_dir), "metrics": metrics, "timings": timings}
    (run_dir / "demo_summary.json").write_text(json.dumps({"timings": timings}, indent=2) + "\n")
    print("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"results in {run_dir} (metrics.jsonl, train.log, eval/) and {paths.report_dir()} (report.html, demo.mp4)")
    return summary

"""``make demo`` / ``dinokit demo``: the whole story on the embedded dataset, resumable.

Each step is skipped when its result is already on disk, so re-running after an interruption
continues where it stopped: data -> pre-training -> kNN of pre-trained vs random-init features.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from dinokit import paths
from dinokit.config import make_config
from dinokit.eval.baselines import random_init_backbone
from dinokit.train.loop import knn_monitor, prepare_split, pretrain
from dinokit.train.run_dir import load_backbone, run_config, run_progress

log = logging.getLogger("dinokit.demo")


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_demo(preset: str = "cpu-demo", out_dir: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    run_dir = Path(out_dir) if out_dir else paths.runs_dir() / preset
    timings: dict[str, float] = {}

    start = _step("1/3 data: the embedded dataset and its fixed split")
    cfg = make_config(preset, overrides)
    split = prepare_split(cfg)
    print(f"{len(split.classes)} classes; {split.summary()}")
    timings["data_s"] = time.perf_counter() - start

    start = _step(f"2/3 pre-training ({preset}) -> {run_dir}")
    done, total = run_progress(run_dir)
    if total and done >= total:
        print(f"already trained ({done}/{total} iterations); delete {run_dir} to retrain")
    else:
        result = pretrain(cfg, out_dir=run_dir, resume=done > 0)
        if result.status != "finished":
            print(f"pre-training {result.status}; run `make demo` again to resume")
            return {"status": result.status, "run_dir": str(run_dir)}
    timings["pretrain_s"] = time.perf_counter() - start

    start = _step("3/3 kNN on the held-out split: pre-trained teacher vs random init")
    cfg = run_config(run_dir)
    device = torch.device("cpu")
    results = {
        "pretrained": knn_monitor(load_backbone(run_dir), split, cfg, device),
        "random_init": knn_monitor(random_init_backbone(cfg), split, cfg, device),
        "chance": 100.0 / len(split.classes),
        "split_sha256": split.sha256,
    }
    timings["knn_s"] = time.perf_counter() - start
    results["timings"] = timings
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "knn_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'features':<14}{'kNN top-1':>10}{'top-5':>8}")
    for name in ("pretrained", "random_init"):
        print(f"{name:<14}{results[name]['top1']:>9.1f}%{results[name]['top5']:>7.1f}%")
    print(f"{'chance':<14}{results['chance']:>9.1f}%")
    print(f"\nresults in {run_dir} (metrics.jsonl, eval/knn_demo.json, train.log)")
    return results

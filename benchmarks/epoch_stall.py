"""The loader's stall at epoch boundaries: one pass over the run (persistent workers) against a
new iterator per epoch (workers forked again each epoch, as dinokit did up to 825050c).

The loader alone, no model: for each batch, the seconds the loop waited for it. Reports the
median wait of the first batch of each epoch after the first, against the median of the others,
for both ways, in fresh processes in alternating order, with the CPU named.

    python benchmarks/epoch_stall.py [--preset cpu-demo] [--workers 2] [--epochs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def waits(preset: str, workers: int, epochs: int, one_pass: bool, iters: int) -> list[list[float]]:
    """Per epoch, the wait for each batch."""
    import torch
    from torch.utils.data import DataLoader

    from dinokit.config import make_config
    from dinokit.train.dist import DistInfo
    from dinokit.train.setup import build_data

    torch.set_num_threads(1)
    cfg = make_config(preset, {"data.num_workers": workers, "train.iters_per_epoch": iters})
    data = build_data(cfg, DistInfo(), torch.device("cpu"))
    out: list[list[float]] = [[] for _ in range(epochs)]
    if one_pass:
        data.sampler.set_range(0, epochs * iters)
        loaders = [data.loader]
    else:  # the old way: a fresh iterator, and fresh workers, per epoch
        kw = {k: getattr(data.loader, k) for k in ("batch_size", "collate_fn", "num_workers", "pin_memory")}
        loaders = [DataLoader(data.loader.dataset, sampler=data.sampler, **kw)]
    it = 0
    for epoch in range(1 if one_pass else epochs):
        if not one_pass:
            data.sampler.set_position(epoch)
        start = time.perf_counter()
        for _ in loaders[0]:
            out[it // iters].append(time.perf_counter() - start)
            it += 1
            time.sleep(0.02)  # a stand-in for the step, so workers can run ahead as in training
            start = time.perf_counter()
    return out


def summary(per_epoch: list[list[float]]) -> dict[str, float]:
    firsts = [e[0] for e in per_epoch[1:]]
    rest = [w for e in per_epoch for w in e[1:]]
    return {"epoch_start_wait_s": statistics.median(firsts), "other_wait_s": statistics.median(rest)}


def main() -> None:
    from dinokit.device import device_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8, help="iterations per epoch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"one pass": [], "per epoch": []}
    for r in range(args.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        for one_pass in order:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                per_epoch = pool.submit(waits, args.preset, args.workers, args.epochs, one_pass, args.iters).result()
            results["one pass" if one_pass else "per epoch"].append(summary(per_epoch))
    report = {"machine": device_name("cpu"), **vars(args)}
    for name, rows in results.items():
        starts = [row["epoch_start_wait_s"] for row in rows]
        others = [row["other_wait_s"] for row in rows]
        report[name] = {"epoch_start_wait_s": statistics.median(starts), "range": [min(starts), max(starts)],
                        "other_wait_s": statistics.median(others)}  # fmt: skip
        print(f"{name:>9}: first batch of an epoch waits {statistics.median(starts) * 1000:.0f} ms "
              f"({min(starts) * 1000:.0f}-{max(starts) * 1000:.0f}), other batches "
              f"{statistics.median(others) * 1000:.0f} ms")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()

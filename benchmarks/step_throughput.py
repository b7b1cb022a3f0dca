"""Pre-training throughput of a preset under several settings, side by side in one sitting.

Each variant trains ``--iters`` iterations in a fresh process (alternating order over rounds, so a
drifting machine hurts every variant alike); the images/s that the training loop itself logs to
``metrics.jsonl`` (first window dropped as warm-up) is reported as median and range per variant,
with the share of step time spent waiting for data.

    python benchmarks/step_throughput.py --preset cpu-demo --set train.precision=fp32 \\
        --variant data.augment_on=loader --variant data.augment_on=device \\
        --variant "data.augment_on=device data.num_workers=1"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _run(preset: str, overrides: list[str], iters: int, out: str, device: str) -> dict:
    from dinokit.config import make_config
    from dinokit.runs import read_metrics
    from dinokit.train.loop import pretrain

    extra = [
        f"train.max_iters={iters}",
        "train.knn_every_epochs=100000",
        "train.log_every=5",
        "train.checkpoint_every=100000",
    ]
    result = pretrain(make_config(preset, overrides + extra), out_dir=out, device=device)
    steps = [m for m in read_metrics(result.run_dir) if "images_per_s" in m][1:]  # drop the warm-up window
    return {
        "images_per_s": statistics.median(m["images_per_s"] for m in steps),
        "data_wait_share": statistics.median(m["data_wait_share"] for m in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every variant")
    parser.add_argument("--variant", action="append", required=True, help="space-separated overrides, one variant")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    results: dict[str, list[dict]] = {v: [] for v in args.variant}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.variant if r % 2 == 0 else args.variant[::-1]
            for variant in order:
                out = os.path.join(tmp, f"r{r}-{abs(hash(variant))}")
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # not daemonic: loader workers may start
                    res = pool.submit(_run, args.preset, args.set + variant.split(), args.iters, out, args.device)
                    res = res.result()
                results[variant].append(res)
                print(f"round {r + 1}: {variant}: {res['images_per_s']:.1f} img/s, "
                      f"data wait {res['data_wait_share']:.0%}", flush=True)  # fmt: skip
    print(f"\n{args.preset} {' '.join(args.set)}, {args.iters} iterations x {args.rounds} rounds, fresh processes:")
    base = statistics.median(x["images_per_s"] for x in results[args.variant[0]])
    for variant, runs in results.items():
        speeds = [x["images_per_s"] for x in runs]
        med = statistics.median(speeds)
        print(f"  {variant:<50} {med:6.1f} img/s (range {min(speeds):.1f}-{max(speeds):.1f}), "
              f"{med / base:.2f}x, data wait {statistics.median(x['data_wait_share'] for x in runs):.0%}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"preset": args.preset, "set": args.set, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

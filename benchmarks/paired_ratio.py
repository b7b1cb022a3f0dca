"""FlashAttention on vs off as a paired ratio with its spread, for machines whose speed drifts.

``dinokit bench`` times each backend once; on a shared CPU a neighbour's load can move one of
those timings by 20 %. This script alternates the two backends (ABBA order, each measurement in a
fresh process) for several rounds and reports every round's ratio, their median and range.

    python benchmarks/paired_ratio.py [--img 224] [--batch 8] [--mode inference] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dinokit.bench import MODES, BenchCase, measure, measure_in_fresh_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--mode", default="inference", choices=MODES)
    parser.add_argument("--off", default="naive")
    parser.add_argument("--on", default="sdpa")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the rounds as JSON here")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = BenchCase(args.arch, args.patch, args.img, args.batch, args.dtype, modes=(args.mode,))
    run = measure_in_fresh_process if device == "cpu" else measure
    rounds = []
    for i in range(args.rounds):
        order = (args.off, args.on) if i % 2 == 0 else (args.on, args.off)
        r = {b: run(case, args.mode, b, device, args.warmup, args.repeats, torch.get_num_threads()) for b in order}
        if any(m["status"] != "ok" for m in r.values()):
            raise SystemExit(f"round {i + 1}: {r}")
        ratio = r[args.off]["latency_ms"] / r[args.on]["latency_ms"]
        rounds.append({"round": i + 1, "order": list(order), "ratio": ratio, **{b: r[b] for b in order}})
        print(
            f"round {i + 1}: {args.off} {r[args.off]['images_per_s']:.2f} img/s, "
            f"{args.on} {r[args.on]['images_per_s']:.2f} img/s, ratio {ratio:.2f}x",
            flush=True,
        )
    ratios = [r["ratio"] for r in rounds]
    print(
        f"{args.arch}/{args.patch} @ {args.img} px, batch {args.batch}, {args.dtype}, {args.mode} on {device}: "
        f"{args.on} / {args.off} = {statistics.median(ratios):.2f}x median over {len(ratios)} rounds "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}x)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"case": vars(case), "rounds": rounds}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

"""How much do heads, losses and EMA add to a bare backbone step, with FlashAttention on/off
and efficient stochastic depth on/off? Prints images/s for each; run with the venv's python.

    python benchmarks/train_step_overhead.py [--img 48] [--arch vit_mini] [--batch 32]
"""

from __future__ import annotations

import argparse

from dinokit.bench import BenchCase, format_table, run_bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--img", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--drop-path", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for efficient in (True, False):
        case = BenchCase(
            args.arch, args.patch, args.img, args.batch, modes=("backbone", "train_step"),
            drop_path=args.drop_path, efficient_drop_path=efficient,
        )  # fmt: skip
        print(f"\nstochastic depth {args.drop_path}, efficient (DINOv2 subset) = {efficient}")
        print(format_table(run_bench([case], repeats=args.repeats, progress=False)))


if __name__ == "__main__":
    main()

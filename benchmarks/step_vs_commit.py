"""`cpu-demo` pre-training throughput of an older checkout against this one, side by side.

Each variant trains ``--iters`` iterations in a fresh process, in alternating order over rounds, with
the older checkout's own code on ``sys.path``; images/s is the median the loop logs to
``metrics.jsonl`` (first window dropped). Against a1a035a, whose preset cut 2 x 48 + 4 x 24 crops
in the loader, ``--pin-a1a035a`` pins the crops to those so both do the same work; without it,
both run the preset as each checkout defines it (for a recent commit with the same preset).

    git worktree add /tmp/before a1a035a
    python benchmarks/step_vs_commit.py --before /tmp/before --pin-a1a035a [--rounds 2]
    git worktree add /tmp/before a32085c     # before the last block computed only what the losses read
    python benchmarks/step_vs_commit.py --before /tmp/before --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SNIPPET = r"""
import json, os, statistics, sys
sys.path.insert(0, os.environ["SRC"])
from dinokit.config import make_config
from dinokit.train.loop import pretrain
try:
    from dinokit.runs import read_metrics
except ImportError:  # before dinokit.runs existed
    from dinokit.train.run_dir import read_metrics
extra = json.loads(os.environ["EXTRA"])
cfg = make_config("cpu-demo", {"train.precision": "fp32", "train.max_iters": int(os.environ["ITERS"]),
                               "train.knn_every_epochs": 100000, "train.log_every": 5,
                               "train.checkpoint_every": 100000, **extra})
result = pretrain(cfg, out_dir=os.environ["OUT"])
steps = [m["images_per_s"] for m in read_metrics(result.run_dir) if "images_per_s" in m][1:]
print("RESULT", statistics.median(steps))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the older commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--pin-a1a035a", action="store_true", help="the crops and augmentation of a1a035a's preset")
    args = parser.parse_args()
    now = Path(__file__).resolve().parents[1]
    if args.pin_a1a035a:
        same_work = {"train.time_budget_min": 0, "crops.n_local": 4}
        variants = {
            f"before ({args.before.name})": (args.before, {}),
            "now, data.augment_on=loader": (now, {"data.augment_on": "loader", **same_work}),
            "now, data.augment_on=device": (now, {"data.augment_on": "device", **same_work}),
        }
    else:
        variants = {
            f"before ({args.before.name})": (args.before, {"train.time_budget_min": 0}),
            "now": (now, {"train.time_budget_min": 0}),
        }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            src, extra = variants[name]
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "SRC": str(src), "EXTRA": json.dumps(extra), "OUT": f"{tmp}/run",
                       "ITERS": str(args.iters), "DINOKIT_DATA_DIR": f"{tmp}/data"}  # fmt: skip
                out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, cwd=src)
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
                if not lines:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
                results[name].append(float(lines[0].split()[1]))
                print(f"round {r + 1}: {name}: {results[name][-1]:.1f} img/s", flush=True)
    base = statistics.median(next(iter(results.values())))
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<40} {median:6.1f} img/s (range {min(values):.1f}-{max(values):.1f})  {median / base:.2f}x")


if __name__ == "__main__":
    main()

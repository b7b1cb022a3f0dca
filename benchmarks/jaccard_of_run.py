"""Re-score a run's attention against the silhouettes without touching its ``eval/metrics.json``.

Prints what ``dinokit eval`` stores as ``attention_jaccard`` (the Jaccard, in %, of the 60 %-mass
CLS attention for the final teacher, random init, the supervised reference if trained, and every
snapshot), plus the teacher's ratio to random init, on the held-out images of an embedded-dataset
run. For runs evaluated before a change to the protocol (e.g. the centre crop dropped in favour of
DINO's whole image), and for comparing attention sizes: ``--size 128``.

    python benchmarks/jaccard_of_run.py runs/cpu-demo-embedded [--size 96]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dinokit import runs
from dinokit.data.har import DatasetError
from dinokit.data.source import prepare_split, resolve_data_root
from dinokit.eval.jaccard import silhouettes_of
from dinokit.eval.run_eval import jaccard_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--size", type=int, help="attention image size (default: the run's crops.attention_size)")
    args = parser.parse_args(argv)
    try:
        cfg = runs.run_config(args.run_dir)
        split = prepare_split(cfg, progress=False)
        runs.check_data(args.run_dir, split.sha256, resolve_data_root(cfg))
    except (FileNotFoundError, runs.RunError, DatasetError) as err:  # no run there, or not its data
        print(f"error: {err}", file=sys.stderr)
        return 2
    silhouettes = silhouettes_of(resolve_data_root(cfg), split.val)
    if silhouettes is None:
        print(f"{args.run_dir}: its dataset has no silhouettes (only the embedded one does)", file=sys.stderr)
        return 2
    backbone = runs.load_backbone(args.run_dir)
    result = jaccard_suite(args.run_dir, cfg, backbone, split, silhouettes, size=args.size)
    result["ratio"] = result["teacher"] / max(result["random_init"], 1e-9)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

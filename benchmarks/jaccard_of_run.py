"""Re-score a run's attention against the silhouettes without touching its ``eval/metrics.json``.

Prints the Jaccard (%) of the 60 %-mass CLS attention for the final teacher, random init and every
snapshot, best head and head mean, on the held-out images of an embedded-dataset run. For runs
evaluated before a change to the protocol (e.g. the centre crop dropped in favour of DINO's whole
image), and for comparing attention sizes: ``--size 128``.

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
from dinokit.eval.baselines import random_init_backbone
from dinokit.eval.jaccard import attention_jaccard, silhouettes_of


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
    size = args.size or cfg.crops.attention_image_size

    def score(model) -> dict:
        out = attention_jaccard(model, split.val, silhouettes, size)
        return {"best": round(out["best"], 1), "head_mean": round(out["head_mean"], 1)}

    result = {"image_size": size, "images": len(split.val), "teacher": score(runs.load_backbone(args.run_dir))}
    result["random_init"] = score(random_init_backbone(cfg))
    container = random_init_backbone(cfg)
    result["snapshots"] = {}
    for path in sorted((args.run_dir / runs.SNAPSHOTS).glob("teacher_*.pt")):
        container.load_state_dict(runs.load_checkpoint(path))
        result["snapshots"][str(int(path.stem.split("_")[1]))] = score(container)
    result["ratio_best"] = round(result["teacher"]["best"] / max(result["random_init"]["best"], 1e-9), 3)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

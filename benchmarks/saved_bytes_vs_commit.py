"""Saved-for-backward bytes per source image of a preset's training step: this checkout against an
older one, each in a fresh process with its own code on ``sys.path``.

What autograd keeps alive for the backward sets a step's peak memory; it is measured exactly on
the CPU (bf16 autocast, the student's forward and the losses, the blocks as a GPU runs them;
parameters not counted, they are resident anyway; one count per storage). Per-step constants
(the bf16 weight copies, the heads' normalised prototypes) weigh heavily at the small batches a
CPU can run, so the script reports
the total per image at ``--batches`` and the marginal bytes per added image (the slope between the
first two), which is what grows with the batch on a GPU.

    git worktree add /tmp/before 825050c   # before issue 19's memory work
    python benchmarks/saved_bytes_vs_commit.py --before /tmp/before [--preset har-vits8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SNIPPET = r"""
import json, os, sys
sys.path.insert(0, os.environ["SRC"])
import torch
from dinokit.config import make_config
from dinokit.losses.objective import DINOv2Objective
from dinokit.models.ssl import build_ssl_model
from dinokit.train.teacher import build_teacher

def batch_of(cfg, b):
    try:  # recent checkouts: the collate's fixed-size iBOT selection
        from dinokit.data.synthetic_batch import synthetic_batch
    except ImportError:  # older ones (825050c): masks only
        from dinokit.data.masking import MaskPlan
        c, m = cfg.crops, cfg.masks
        grid = (c.global_size // cfg.model.patch_size,) * 2
        plan = MaskPlan.draw(0, 0, 2 * b, m.probability, (m.ratio_min, m.ratio_max))
        masks = plan.masks(grid, torch.arange(2 * b).numpy(), 0, 0)
        return {"global": torch.randn(2 * b, 3, c.global_size, c.global_size),
                "local": torch.randn(c.n_local * b, 3, c.local_size, c.local_size), "masks": masks}, {}, masks
    out = synthetic_batch(cfg, b)
    return out, {"order": out["mask_order"], "rows": out["mask_rows"]}, out["mask_weights"]

cfg = make_config(os.environ["PRESET"])
b = int(os.environ["BATCH"])
torch.manual_seed(0)
student = build_ssl_model(cfg.model, cfg.crops.global_size)
try:  # the step as a GPU runs it (older checkouts have no lean branches)
    from dinokit.models.lean_branch import lean_branches_pay, set_lean_branches
    set_lean_branches(student.backbone, lean_branches_pay("cuda"))
except ImportError:
    pass
teacher = build_teacher(student)
objective = DINOv2Objective(cfg.loss, cfg.model.head_prototypes)
bt, sel, weights = batch_of(cfg, b)
saved = {}
def pack(t):
    base = t if t._base is None else t._base
    if not (base.is_leaf and base.requires_grad):  # parameters and views of them: resident anyway
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
with torch.autocast("cpu", dtype=torch.bfloat16):
    with torch.no_grad():
        t_out = teacher(bt["global"], masks=bt["masks"], mask_input=False, **sel)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s_out = student(bt["global"], bt["local"], bt["masks"], **sel)
        objective(s_out, t_out, weights, 0.04)
print(json.dumps({"saved_bytes": sum(saved.values())}))
"""


def measure(src: Path, preset: str, batch: int) -> int:
    env = {**os.environ, "SRC": str(src), "PRESET": preset, "BATCH": str(batch), "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["saved_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="an older checkout (git worktree)")
    parser.add_argument("--preset", default="har-vits8")
    parser.add_argument("--batches", type=int, nargs=2, default=(2, 4))
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    rows = {}
    for name, src in (("before", args.before.resolve()), ("now", here)):
        small, large = (measure(src, args.preset, b) for b in args.batches)
        marginal = (large - small) / (args.batches[1] - args.batches[0])
        rows[name] = {f"batch {b}": v / b / 1e6 for b, v in zip(args.batches, (small, large), strict=True)}
        rows[name]["marginal"] = marginal / 1e6
        print(f"{name:>7} ({src}): " + ", ".join(f"{k} {v:.0f} MB/img" for k, v in rows[name].items()))
    for key in rows["now"]:
        print(f"now / before, {key}: {rows['now'][key] / rows['before'][key]:.2f}x")


if __name__ == "__main__":
    main()

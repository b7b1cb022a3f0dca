"""Estimate time and memory of a preset's pre-training per GPU class, without a GPU.

* FLOPs: one real training step at a small batch on the CPU under ``FlopCounterMode`` (matmuls,
  convolutions, attention), per source image; x images x epochs / (peak x utilisation) gives hours.
* Memory: the bytes of every tensor autograd saves for the backward (``saved_tensors_hooks``, one
  count per storage) during the same step under bf16 autocast, scaled to the preset's batch; plus
  weights, gradients, AdamW moments and the teacher. CUDA's autocast runs softmax in fp32, so the
  naive path there also keeps an fp32 copy of every N x N probability matrix: added (x3 in total).

Estimates, labelled as such until a GPU measures them (``bash benchmarks/gpu_smoke.sh``).

    python benchmarks/estimate_gpu_budget.py [--preset har-vits8] [--batch 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinokit.config import make_config
from dinokit.data.synthetic_batch import synthetic_batch
from dinokit.losses.objective import DINOv2Objective
from dinokit.models.lean_branch import lean_branches_pay, set_lean_branches
from dinokit.models.ssl import build_ssl_model
from dinokit.train.proxies import is_parameter
from dinokit.train.teacher import build_teacher

# Dense peak TFLOP/s in the precision auto picks there (NVIDIA datasheets): fp16 below sm80, bf16 above.
GPUS = {
    "P100 16 GB (fp16)": (21.2, 16),
    "T4 16 GB (fp16)": (65.0, 16),
    "V100 16/32 GB (fp16)": (125.0, 16),
    "A100 40/80 GB (bf16)": (312.0, 40),
    "H100 80 GB SXM (bf16)": (989.0, 80),
}
UTILISATION = 0.30  # a ViT-S (width 384) rarely keeps big tensor cores busier; an assumption


def _step(cfg, batch: int, checkpointing: bool) -> tuple[float, float]:
    """(FLOPs per source image, activation bytes per source image) of one step, on the CPU in bf16."""
    c = cfg.crops
    torch.manual_seed(0)
    student = build_ssl_model(cfg.model, c.global_size)
    student.backbone.grad_checkpointing = checkpointing
    set_lean_branches(student.backbone, lean_branches_pay("cuda"))  # the GPU's step, measured here
    teacher = build_teacher(student)
    objective = DINOv2Objective(cfg.loss, cfg.model.head_prototypes)
    batch_ = synthetic_batch(cfg, batch)
    globals_, locals_, masks = batch_["global"], batch_["local"], batch_["masks"]
    order, rows = batch_["mask_order"], batch_["mask_rows"]
    saved: dict[int, int] = {}
    square: dict[int, int] = {}  # N x N attention probabilities (naive path)

    def pack(t: torch.Tensor):
        if is_parameter(t):  # resident anyway
            return t
        key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        saved[key] = size
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] > 16:
            square[key] = size
        return t

    flops = FlopCounterMode(display=False)
    with flops, torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            t_out = teacher(globals_, masks=masks, mask_input=False, order=order, rows=rows)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            s_out = student(globals_, locals_, masks, order=order, rows=rows)
            loss, _ = objective(s_out, t_out, batch_["mask_weights"], 0.04)
        loss.backward()
    cuda_softmax_fp32 = 2 * sum(square.values())  # an fp32 copy beside each bf16 matrix on CUDA
    return flops.get_total_flops() / batch, (sum(saved.values()) + cuda_softmax_fp32) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="har-vits8")
    parser.add_argument("--batch", type=int, default=2, help="batch for the CPU count (scaled linearly)")
    parser.add_argument("--images", type=int, default=15_480, help="images per epoch (HAR: 10,080 train + 5,400)")
    args = parser.parse_args()
    cfg = make_config(args.preset)
    b = cfg.optim.batch_size
    n_params = sum(p.numel() for p in build_ssl_model(cfg.model, cfg.crops.global_size).parameters())
    fixed_gb = n_params * (4 + 4 + 8 + 4) / 1e9  # fp32 weights, grads, AdamW moments, teacher
    print(
        f"{args.preset}: batch {b}, {cfg.optim.epochs} epochs x {args.images:,} images, {n_params / 1e6:.1f} M params"
    )
    rows = {}
    for attention in ("sdpa", "naive"):
        for checkpointing in (False, True):
            cfg.model.attention = attention
            flops, act = _step(cfg, args.batch, checkpointing)
            rows[(attention, checkpointing)] = (flops, act)
    flops = rows[("sdpa", False)][0]
    print(f"\ntraining FLOPs per source image: {flops / 1e9:.0f} GFLOP (counted on a real step)")
    print(f"\n{'GPU':<24}{'peak TF/s':>10}{'hours (est.)':>14}")
    total = flops * args.images * cfg.optim.epochs
    for name, (peak, _) in GPUS.items():
        print(f"{name:<24}{peak:>10.0f}{total / (peak * 1e12 * UTILISATION) / 3600:>14.1f}")
    print(f"(at {UTILISATION:.0%} of peak; the naive path adds the FLOPs above at a lower utilisation)")
    print(f"\nmemory per GPU (est.; {fixed_gb:.1f} GB of it weights, grads, AdamW moments, teacher)")
    for batch in (b, b // 2):
        for (attention, checkpointing), (_, act) in rows.items():
            gb = fixed_gb + act * batch / 1e9
            fits = ", ".join(n.split()[0] for n, (_, mem) in GPUS.items() if gb < 0.9 * mem)
            what = f"batch {batch}, {attention}{' + checkpointing' if checkpointing else ''}"
            print(f"  {what:<34}{gb:>7.1f} GB   fits: {fits or 'none'}")


if __name__ == "__main__":
    main()

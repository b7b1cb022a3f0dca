"""AdamW over the parameter groups, with the fused implementation wherever it runs.

The fused kernel updates every parameter of every group in a few launches (the ``foreach`` path
launches per group, and DINOv2 has ~30 groups from layer-wise decay), and it keeps each
parameter's step count as a tensor it reads itself: ``foreach`` reads it on the host, twice per
group per step (86 host reads in a ``ci`` step, counted by :mod:`dinokit.train.proxies`). PyTorch
has it for CUDA and, since 2.4, the CPU. FSDP's sharded parameters take the default path, the one
they are tested with.
"""

from __future__ import annotations

import torch
from torch import nn

from dinokit.train.param_groups import build_param_groups


def adamw_impl(device_type: str, sharded: bool = False) -> dict[str, bool]:
    """Keyword arguments choosing AdamW's implementation (table-tested)."""
    if sharded:
        return {}
    return {"fused": device_type in ("cuda", "cpu")}


def build_optimizer(
    student: nn.Module,
    device: torch.device,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    sharded: bool = False,
) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999, as DINOv2) over :func:`build_param_groups`; lr and wd are set per step."""
    depth = len(student.backbone.blocks)
    groups = build_param_groups(student, depth, layerwise_decay, patch_embed_lr_mult)
    params = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(params, betas=(0.9, 0.999), **adamw_impl(device.type, sharded))

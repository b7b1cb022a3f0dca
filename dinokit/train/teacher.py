"""The EMA teacher: a frozen copy of the student, updated as t <- m t + (1 - m) s each step."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dinokit.train.fsdp import local


def build_teacher(student: nn.Module) -> nn.Module:
    """A copy in eval mode (no stochastic depth) that never receives gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params, s_params = [], []
    for (tn, tp), (sn, sp) in zip(teacher.named_parameters(), student.named_parameters(), strict=True):
        # DDP adds "module.", torch.compile "_orig_mod.": the same parameter underneath.
        if tn != sn.replace("_orig_mod.", "").removeprefix("module."):
            raise ValueError(f"teacher and student parameters differ: {tn} vs {sn}")
        # Sharded (FSDP) parameters: update this process's shard; student and teacher shard alike.
        t_params.append(local(tp))
        s_params.append(local(sp.detach()))
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)

"""One DINOv2 training step, readable in one screen: the heart of ``dinokit pretrain``.

Teacher forward on the global crops (no grad), student forward on masked global crops and local
crops, the loss terms named and summed, backward (scaled in fp16), gradient clipping per module,
optimizer step, EMA of the teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from dinokit.losses.objective import DINOv2Objective
from dinokit.models.ssl import SSLModel
from dinokit.precision import autocast
from dinokit.train.param_groups import apply_schedules
from dinokit.train.teacher import ema_update

MASK_KEYS = ("masks", "mask_order", "mask_rows", "mask_weights")


def train_step(
    student: nn.Module,
    teacher: SSLModel,
    objective: DINOv2Objective,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict,
    sched: dict[str, float],
    precision: str,
    device: torch.device,
    clip_grad: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One DINOv2 step. Returns the total loss and the logged terms, all still on the device.

    Nothing here waits for the device (bf16 / fp32): the caller reads the numbers, and checks the
    loss is finite, at log steps only. A non-finite step is not skipped; the loop stops at its next
    check, before any checkpoint could save what it did.
    """
    global_crops = batch["global"].to(device, non_blocking=True)
    local_crops = batch["local"].to(device, non_blocking=True) if "local" in batch else None
    masks, order, rows, mask_weights = (batch[k].to(device, non_blocking=True) for k in MASK_KEYS)
    apply_schedules(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])

    with autocast(precision, device):
        with torch.no_grad():  # the teacher sees only the unmasked global crops
            teacher_out = teacher(global_crops, masks=masks, mask_input=False, order=order, rows=rows)
        student_out = student(global_crops, local_crops, masks, order=order, rows=rows)  # masked globals + locals
        loss, logs = objective(student_out, teacher_out, mask_weights, sched["teacher_temp"])

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        for name, module in clipped_modules(student).items():
            logs[f"grad_norm_{name}"] = _full(nn.utils.clip_grad_norm_(module.parameters(), clip_grad, foreach=True))
    if scaler.is_enabled():  # fp16: the scaler reads its overflow flag on the host anyway
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skipped by the scaler when an fp16 gradient overflowed
        scaler.update()
        logs["loss_scale"] = scaler.get_scale()
        logs["amp_skipped"] = float(logs["loss_scale"] < scale_before)
    else:
        optimizer.step()
    ema_update(teacher, student, sched["momentum"])
    return loss.detach(), logs


def clipped_modules(student: nn.Module) -> dict[str, nn.Module]:
    """The parts clipped separately, as the official loop does: backbone, DINO head, iBOT head.

    One total norm over all of them would let a large head gradient shrink the backbone's update.
    """
    model = student
    while not isinstance(model, SSLModel):  # DDP's .module, torch.compile's ._orig_mod
        model = getattr(model, "module", None) or model._orig_mod
    parts = {"backbone": model.backbone, "dino_head": model.dino_head}
    if model.ibot_head is not None:
        parts["ibot_head"] = model.ibot_head
    return parts


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

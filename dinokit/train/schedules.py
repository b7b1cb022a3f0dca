"""Per-iteration schedules, precomputed as arrays (as DINO / DINOv2 do) and indexed by step.

Precomputing makes them trivial to unit-test, to plot, and to resume at any iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinokit.config import Config


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then a cosine from ``base`` to ``final``.

    As in DINO's ``cosine_scheduler``: step i of the n cosine steps is
    final + (base - final) * (1 + cos(pi * i / n)) / 2, so the last step sits just above ``final``.
    """
    warmup_iters = min(warmup_iters, total_iters)
    warmup = np.linspace(warmup_start, base, warmup_iters) if warmup_iters else np.array([])
    steps = np.arange(total_iters - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def warmup_then_constant(start: float, end: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    """Linear from ``start`` to ``end`` over ``warmup_iters``, then ``end`` (teacher temperature)."""
    warmup_iters = min(warmup_iters, total_iters)
    return np.concatenate([np.linspace(start, end, warmup_iters), np.full(total_iters - warmup_iters, end)])


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """DINOv2 scales with sqrt(batch / 1024); DINO linearly with batch / 256."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling must be sqrt, linear or none; got {rule!r}")


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray  # lr for the prototypes: 0 while they are frozen

    def at(self, it: int) -> dict[str, float]:
        return {
            "lr": float(self.lr[it]),
            "wd": float(self.weight_decay[it]),
            "momentum": float(self.momentum[it]),
            "teacher_temp": float(self.teacher_temp[it]),
            "last_layer_lr": float(self.last_layer_lr[it]),
        }


def recipe_share(cfg: Config) -> float:
    """The trained share of the recipe: below 1 when a time budget cut ``optim.epochs`` short of
    ``optim.recipe_epochs``. Warm-ups and the freeze are scaled by it, so a run capped at 20 % of
    its recipe still warms up over the first 10 % of its iterations, not half of them; the
    cosines span the run anyway."""
    o = cfg.optim
    return min(1.0, o.epochs / o.recipe_epochs) if o.recipe_epochs > 0 else 1.0


def build_schedules(cfg: Config, iters_per_epoch: int, total_iters: int, global_batch: int) -> Schedules:
    o = cfg.optim
    share = recipe_share(cfg)

    def iters(epochs: float) -> int:
        return round(epochs * iters_per_epoch * share)

    peak = scaled_lr(o.base_lr, global_batch, o.lr_scaling)
    lr = cosine_schedule(peak, o.min_lr, total_iters, iters(o.warmup_epochs))
    freeze = min(iters(o.freeze_last_layer_epochs), total_iters)
    last_layer_lr = lr.copy()
    last_layer_lr[:freeze] = 0.0
    return Schedules(
        lr=lr,
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, total_iters),
        momentum=cosine_schedule(o.momentum_teacher, o.momentum_teacher_end, total_iters),
        teacher_temp=warmup_then_constant(
            cfg.loss.warmup_teacher_temp,
            cfg.loss.teacher_temp,
            total_iters,
            iters(cfg.loss.warmup_teacher_temp_epochs),
        ),
        last_layer_lr=last_layer_lr,
    )

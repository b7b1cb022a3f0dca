"""The DINOv2 objective: DINO on CLS + iBOT on masked patches + KoLeo, named and summed."""

from __future__ import annotations

import torch
from torch import nn

from dinokit.config import LossConfig
from dinokit.data.masking import mask_weights
from dinokit.losses.dino import DINOLoss
from dinokit.losses.ibot import IBOTPatchLoss
from dinokit.losses.koleo import KoLeoLoss
from dinokit.losses.monitor import collapse_stats
from dinokit.losses.teacher_norm import Centering, sinkhorn_knopp

# How teacher logits become targets: centering (DINO, DINOv2's default), Sinkhorn-Knopp (DINOv2's
# option), or "none": sharpening only, which exists to show the collapse centering prevents.
NORMALIZATIONS = ("centering", "sinkhorn", "none")


class DINOv2Objective(nn.Module):
    def __init__(self, cfg: LossConfig, out_dim: int, n_global: int = 2) -> None:
        super().__init__()
        if cfg.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"loss.normalization must be one of {', '.join(NORMALIZATIONS)}, got {cfg.normalization!r}"
            )
        self.cfg = cfg
        self.n_global = n_global
        self.dino = DINOLoss(cfg.student_temp)
        self.ibot = IBOTPatchLoss(cfg.student_temp)
        self.koleo = KoLeoLoss()
        self.dino_center = Centering(out_dim, cfg.center_momentum)
        self.ibot_center = Centering(out_dim, cfg.center_momentum)

    def _targets(self, logits: torch.Tensor, temp: float, center: Centering) -> torch.Tensor:
        if self.cfg.normalization == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iters)
        if self.cfg.normalization == "none":  # sharpening alone: the ablation that collapses
            return torch.softmax(logits.float() / temp, dim=-1)
        targets = center.targets(logits, temp)
        center.update(logits)  # after use, as DINO does: the centre lags one batch
        return targets

    def forward(
        self,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
        masks: torch.Tensor,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        t_global = self._targets(teacher["dino_global"], teacher_temp, self.dino_center)
        student_views = list(student["dino_global"].chunk(self.n_global))
        if "dino_local" in student:
            batch = t_global.shape[0] // self.n_global
            n_local = student["dino_local"].shape[0] // batch
            student_views += list(student["dino_local"].chunk(n_local))
        terms = {"dino": self.dino(student_views, list(t_global.chunk(self.n_global)))}
        if cfg.ibot_weight > 0 and "ibot" in student:
            t_patch = self._targets(teacher["ibot"], teacher_temp, self.ibot_center)
            terms["ibot"] = self.ibot(student["ibot"], t_patch, mask_weights(masks), masks.shape[0])
        if cfg.koleo_weight > 0:
            # Per global view, as DINOv2: neighbours are other images of the same view.
            terms["koleo"] = sum(self.koleo(c) for c in student["cls"].chunk(self.n_global))
        weights = {"dino": cfg.dino_weight, "ibot": cfg.ibot_weight, "koleo": cfg.koleo_weight}
        total = sum(weights[k] * v for k, v in terms.items())
        logs = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        logs.update({f"teacher_{k}": v for k, v in collapse_stats(t_global).items() if k != "log_k"})
        return total, logs

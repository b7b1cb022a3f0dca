"""The DINOv2 objective: DINO on CLS + iBOT on masked patches + KoLeo, named and summed.

The student and teacher hand over head embeddings and prototype matrices (not logits): the
cross-entropies form the logits chunk by chunk (:mod:`dinokit.losses.prototype_ce`), and the
teacher's targets are built chunk by chunk too, so no (rows, 65,536) fp32 tensor lives through
the backward. ``DINOLoss`` and ``IBOTPatchLoss`` are the same losses written out on logits (the
notebooks' version); tests hold the two equal. Logged terms stay on the device as 0-dim tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from dinokit.config import LossConfig
from dinokit.losses.koleo import KoLeoLoss
from dinokit.losses.monitor import collapse_stats
from dinokit.losses.prototype_ce import chunk_rows, prototype_cross_entropy, prototype_logits
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
        self.koleo = KoLeoLoss()
        self.dino_center = Centering(out_dim, cfg.center_momentum)
        self.ibot_center = Centering(out_dim, cfg.center_momentum)

    @torch.no_grad()
    def _targets(
        self, z: torch.Tensor, weight: torch.Tensor, temp: float, center: Centering, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher targets (rows, K) in fp32 from embeddings ``z`` and prototypes ``weight``."""
        if self.cfg.normalization == "sinkhorn":
            return sinkhorn_knopp(prototype_logits(z, weight), temp, self.cfg.sinkhorn_iters, valid)
        targets = torch.empty(z.shape[0], weight.shape[0], device=z.device)
        total = torch.zeros(1, weight.shape[0], device=z.device)
        step = chunk_rows(weight.shape[0])
        for s in range(0, z.shape[0], step):
            logits = prototype_logits(z[s : s + step], weight)
            if self.cfg.normalization == "none":  # sharpening alone: the ablation that collapses
                targets[s : s + step] = torch.softmax(logits / temp, dim=-1)
                continue
            targets[s : s + step] = center.targets(logits, temp)
            total += logits.sum(0) if valid is None else valid[s : s + step].float() @ logits
        if self.cfg.normalization == "centering":  # after use, as DINO does: the centre lags one batch
            center.update_from_sum(total, z.shape[0] if valid is None else valid.sum())
        return targets

    def _dino(self, student: dict[str, torch.Tensor], t_global: torch.Tensor) -> torch.Tensor:
        """Every (teacher global view, other student view) pair, averaged over pairs and images.

        Cross-entropy is linear in the target, so each student view is scored once against the sum
        of the teacher views it is paired with (the other global view; both for a local view).
        """
        n_global = self.n_global
        b = t_global.shape[0] // n_global
        views = t_global.view(n_global, b, -1)
        both = views.sum(0)
        z, targets = [student["dino_global"]], [(both[None] - views).flatten(0, 1)]
        n_local = student["dino_local"].shape[0] // b if "dino_local" in student else 0
        if n_local:
            z.append(student["dino_local"])
            targets.append(both.repeat(n_local, 1))
        # dinov2's count (ssl_meta_arch.py): at least one local "pair" even without local crops, so two
        # global views alone divide by 3. DINOLoss, the notebooks' average over pairs, divides by 2 there.
        pairs = n_global * (n_global - 1) + max(n_global * n_local, 1)
        z_all = torch.cat(z)
        weights = z_all.new_full((z_all.shape[0],), 1.0 / (pairs * b))
        return prototype_cross_entropy(
            z_all, student["dino_prototypes"], torch.cat(targets), weights, self.cfg.student_temp
        )

    def forward(
        self,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
        mask_weights: torch.Tensor,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mask_weights`` (rows,): iBOT's 1 / (masked patches of the row's crop), 0 on padding rows.

        iBOT sums the weighted patch cross-entropies and divides by the number of global crops, so
        every image weighs the same whatever its mask size (dinov2/loss/ibot_patch_loss.py).
        """
        cfg = self.cfg
        t_global = self._targets(teacher["dino_global"], teacher["dino_prototypes"], teacher_temp, self.dino_center)
        terms = {"dino": self._dino(student, t_global)}
        if cfg.ibot_weight > 0 and "ibot" in student:
            valid = mask_weights > 0
            t_patch = self._targets(teacher["ibot"], teacher["ibot_prototypes"], teacher_temp, self.ibot_center, valid)
            ibot = prototype_cross_entropy(
                student["ibot"], student["ibot_prototypes"], t_patch, mask_weights, cfg.student_temp
            )
            terms["ibot"] = ibot / student["cls"].shape[0]
        if cfg.koleo_weight > 0:
            # Per global view, as DINOv2: neighbours are other images of the same view.
            terms["koleo"] = sum(self.koleo(c) for c in student["cls"].chunk(self.n_global))
        weights = {"dino": cfg.dino_weight, "ibot": cfg.ibot_weight, "koleo": cfg.koleo_weight}
        total = sum(weights[k] * v for k, v in terms.items())
        logs = {f"loss_{k}": v.detach() for k, v in terms.items()}
        logs.update({f"teacher_{k}": v for k, v in collapse_stats(t_global).items() if k != "log_k"})
        return total, logs

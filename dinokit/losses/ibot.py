"""The iBOT loss: the student predicts the teacher's targets for its own masked patches.

Each masked patch's cross-entropy is weighted by 1 / (masked patches in its image), summed and
divided by the number of global crops, so every image weighs the same whatever its mask size
(as dinov2/loss/ibot_patch_loss.py). The division by the crop count, not by the masked-crop
count, keeps the loss identical when a batch is split across processes.
"""

from __future__ import annotations

import torch
from torch import nn


class IBOTPatchLoss(nn.Module):
    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self, student_logits: torch.Tensor, teacher_targets: torch.Tensor, weights: torch.Tensor, n_crops: int
    ) -> torch.Tensor:
        """Logits and targets of the masked patches only, (M, K); ``weights`` (M,)."""
        if student_logits.numel() == 0:
            return student_logits.sum() * 0.0
        log_probs = torch.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        per_patch = torch.sum(-teacher_targets * log_probs, dim=-1)
        return (per_patch * weights).sum() / n_crops

"""The DINO loss on CLS tokens: cross-entropy between teacher targets and student outputs.

Every (teacher global view, student view) pair counts except a view with itself, averaged over
pairs; the student temperature is 0.1 (DINO / DINOv2 defaults).
"""

from __future__ import annotations

import torch
from torch import nn


class DINOLoss(nn.Module):
    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_logits: list[torch.Tensor], teacher_targets: list[torch.Tensor]) -> torch.Tensor:
        """``student_logits``: one (B, K) tensor per view, global views first, in the teacher's order."""
        log_probs = [torch.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
        total, pairs = 0.0, 0
        for ti, t in enumerate(teacher_targets):
            for si, s in enumerate(log_probs):
                if si == ti:
                    continue  # same view for teacher and student: no learning signal
                total = total + torch.sum(-t * s, dim=-1).mean()
                pairs += 1
        return total / pairs

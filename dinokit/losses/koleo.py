"""KoLeo regulariser (Sablayrolles et al. 2019, used by DINOv2 with weight 0.1).

-mean(log d_i), d_i the distance from each L2-normalised feature to its nearest neighbour in the
batch: it spreads the CLS features uniformly so that no two images share one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-2.0)  # never pick yourself
            nearest = sim.argmax(dim=1)
        distances = (x - x[nearest]).norm(dim=-1)
        return -torch.log(distances + self.eps).mean()

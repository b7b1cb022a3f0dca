"""A toy DINO in a few hundred steps, to see why centering and sharpening are both needed.

Data: points from a few Gaussian clusters; two "views" of a point are two noisy copies. The
student is a small MLP onto K prototypes, the teacher its EMA, trained with dinokit's own
:class:`DINOLoss` and :class:`Centering`. Switching centering off or raising the teacher
temperature to the student's shows the two collapses the collapse monitor is built to catch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dinokit.losses.dino import DINOLoss
from dinokit.losses.monitor import collapse_stats
from dinokit.losses.teacher_norm import Centering


def toy_dino(
    centering: bool = True,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    center_momentum: float = 0.9,
    steps: int = 300,
    n_prototypes: int = 32,
    n_clusters: int = 8,
    dim: int = 16,
    batch: int = 128,
    momentum: float = 0.99,
    lr: float = 1e-2,
    cluster_scale: float = 0.5,  # overlapping clusters: both collapses show within 300 steps
    seed: int = 0,
) -> dict[str, list[float]]:
    """Train the toy and return per-step ``loss``, ``entropy`` and ``kl_uniform`` of the targets."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=gen) * cluster_scale
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, n_prototypes))
    teacher = copy.deepcopy(student).requires_grad_(False)
    centre = Centering(n_prototypes, center_momentum)
    loss_fn = DINOLoss(student_temp)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    history: dict[str, list[float]] = {"loss": [], "entropy": [], "kl_uniform": []}
    for _ in range(steps):
        labels = torch.randint(0, n_clusters, (batch,), generator=gen)
        points = centres[labels]
        views = [points + torch.randn(points.shape, generator=gen) for _ in range(2)]
        with torch.no_grad():
            t_logits = teacher(torch.cat(views))
            if centering:
                targets = centre.targets(t_logits, teacher_temp)
                centre.update(t_logits)
            else:
                targets = torch.softmax(t_logits / teacher_temp, dim=-1)
        s_logits = student(torch.cat(views))
        loss = loss_fn(list(s_logits.chunk(2)), list(targets.chunk(2)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the EMA teacher, in two lines: t <- m t + (1 - m) s
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        stats = collapse_stats(targets)
        history["loss"].append(float(loss.detach()))
        history["entropy"].append(float(stats["entropy"]))
        history["kl_uniform"].append(float(stats["kl_uniform"]))
    return history

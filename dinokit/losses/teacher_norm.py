"""Turning teacher logits into targets: centering + sharpening, or Sinkhorn-Knopp.

Centering (DINO): subtract an EMA of the batch-mean logits, then a low-temperature softmax.
Centering alone pushes towards uniform outputs and sharpening alone towards one winning
prototype; together they avoid both collapses. Sinkhorn-Knopp (SwAV, DINOv2) instead makes
the batch's assignment to prototypes equipartitioned with a few normalisation sweeps; in a
distributed run the sums run over all processes' samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Centering(nn.Module):
    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax((teacher_logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """EMA of the mean logit over the global batch (all processes); ``valid`` (rows,) bool
        leaves out padding rows (iBOT's fixed-size selection)."""
        logits = teacher_logits.float()
        if valid is None:
            self.update_from_sum(logits.sum(dim=0, keepdim=True), logits.shape[0])
        else:
            self.update_from_sum((valid.float() @ logits)[None], valid.sum())

    @torch.no_grad()
    def update_from_sum(self, total: torch.Tensor, count: int | torch.Tensor) -> None:
        """The EMA step from the sum (1, K) and the number of rows it covers.

        A batch with no rows (iBOT when no crop of the global batch drew a mask) leaves the centre
        as it is: 0/0 would make it NaN for good. Decided on the device, without a sync.
        """
        count = total.new_full((1,), count) if isinstance(count, int) else count.float().reshape(1)
        if _dist_on():
            dist.all_reduce(total)
            dist.all_reduce(count)
        updated = self.center * self.momentum + (total / count.clamp(min=1)) * (1 - self.momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, temperature: float, n_iters: int = 3, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets whose columns (prototypes) share the global batch equally; rows sum to 1.

    ``valid`` (rows,) bool: padding rows take no share and come back as zeros.
    """
    logits = teacher_logits.float()
    # A process may hold no rows (iBOT when none of its crops drew a mask): it still joins every
    # all-reduce, with neutral values, so the others do not wait for it forever.
    peak = logits.max() if logits.numel() else torch.tensor(float("-inf"), device=logits.device)
    if _dist_on():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - peak) / temperature).t()  # (K, B); the shift cancels in the sweeps
    if valid is not None:
        q.mul_(valid.to(q.dtype))
    b = valid.sum().float() if valid is not None else q.new_full((), float(q.shape[1]))
    if _dist_on():
        dist.all_reduce(b)
    k = q.shape[0]
    total = q.sum()
    if _dist_on():
        dist.all_reduce(total)
    tiny = torch.finfo(q.dtype).tiny  # sums of nothing (no valid row, padding columns) stay 0, not 0/0
    q /= total.clamp_min(tiny)
    for _ in range(n_iters):
        rows = q.sum(dim=1, keepdim=True)
        if _dist_on():
            dist.all_reduce(rows)
        q /= rows.clamp_min(tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= b.clamp_min(1)
    q *= b
    return q.t()

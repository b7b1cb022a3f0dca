"""Collapse monitor: two numbers that tell the two kinds of collapse apart.

* ``entropy``: mean per-sample entropy of the teacher targets. Near log K: every target is
  uniform (collapse by flattening, e.g. no sharpening).
* ``kl_uniform``: KL(batch-mean target || uniform) = log K - H(mean). Near log K: every image
  picks the same prototype (collapse to one mode, e.g. no centering).
A healthy run has both well below log K: sharp targets spread over many prototypes.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def collapse_stats(targets: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """``entropy`` and ``kl_uniform`` as 0-dim tensors (read them with ``float``: the training loop
    reads them only at log steps, so the device never waits for the host), ``log_k`` a float."""
    p = targets.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(-1).mean()
    mean = p.mean(0)
    batch_entropy = -(mean * mean.log()).sum()
    log_k = math.log(p.shape[-1])
    return {"entropy": entropy, "kl_uniform": log_k - batch_entropy, "log_k": log_k}

"""iBOT block masks, as in BEiT / iBOT / DINOv2.

A mask is built from random rectangles (area >= 4 patches, aspect ratio in [0.3, 1/0.3]) until
the requested number of patches is covered. DINOv2 masks half of the global crops, with mask
ratios spread evenly over [0.1, 0.5] across the batch. Here each global crop draws its own mask
from a generator seeded by (seed, image index, view), so a sample's mask does not depend on which
batch or which process it lands in: resumed and distributed runs see the same masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def block_mask(
    grid: tuple[int, int],
    n_masked: int,
    rng: np.random.Generator,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 10,
) -> np.ndarray:
    """A boolean ``grid`` mask with about ``n_masked`` True cells, made of rectangles."""
    h, w = grid
    mask = np.zeros(grid, dtype=bool)
    n_masked = min(n_masked, h * w)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    stalls = 0
    while mask.sum() < n_masked and stalls < 100:
        remaining = n_masked - int(mask.sum())
        added = 0
        for _ in range(max_tries):
            area = rng.uniform(min(min_block, remaining), max(min(min_block, remaining), remaining))
            ratio = math.exp(rng.uniform(*log_aspect))
            bh = min(h, max(1, int(round(math.sqrt(area * ratio)))))
            bw = min(w, max(1, int(round(math.sqrt(area / ratio)))))
            top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            block = mask[top : top + bh, left : left + bw]
            new = int((~block).sum())
            if 0 < new <= remaining:
                block[:] = True
                added = new
                break
        stalls = 0 if added else stalls + 1
    return mask


def sample_masks(
    grid: tuple[int, int],
    n_views: int,
    rng: np.random.Generator,
    probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """Masks for ``n_views`` crops of one image: each masked with ``probability`` at a random ratio."""
    n = grid[0] * grid[1]
    out = np.zeros((n_views, n), dtype=bool)
    for v in range(n_views):
        if rng.random() < probability:
            out[v] = block_mask(grid, int(round(n * rng.uniform(*ratio))), rng).reshape(-1)
    return torch.from_numpy(out)


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per masked patch, 1 / (masked patches in its image): each image weighs the same in iBOT."""
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).float()
    return (1.0 / per_image).expand_as(masks)[masks]

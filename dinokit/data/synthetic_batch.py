"""A training batch as the collate hands it over, from random pixels: for benchmarks and tests.

The crops are noise, the iBOT masks are the real plan's (:class:`dinokit.data.masking.MaskPlan`)
with the collate's fixed-size selection, so a step on it does exactly the work of a real step.
"""

from __future__ import annotations

import numpy as np
import torch

from dinokit.config import Config
from dinokit.data.masking import MaskPlan, mask_selection


def synthetic_batch(cfg: Config, batch: int, seed: int = 0, iteration: int = 0) -> dict:
    """``{"global", "local", "masks", "mask_order", "mask_rows", "mask_weights", "size"}`` on the CPU."""
    c, m = cfg.crops, cfg.masks
    gen = torch.Generator().manual_seed(seed)
    grid = (c.global_size // cfg.model.patch_size,) * 2
    n_crops = 2 * batch
    ratio = (m.ratio_min, m.ratio_max)
    masks = MaskPlan.draw(seed, iteration, n_crops, m.probability, ratio).masks(
        grid, np.arange(n_crops), seed, iteration
    )
    width, rows = MaskPlan.row_bound(grid, n_crops, n_crops, m.probability, ratio)
    out = {
        "global": torch.randn(n_crops, 3, c.global_size, c.global_size, generator=gen),
        "masks": masks,
        "size": batch,
        **mask_selection(masks, width, rows),
    }
    if c.n_local:
        out["local"] = torch.randn(c.n_local * batch, 3, c.local_size, c.local_size, generator=gen)
    return out

"""iBOT block masks, as in BEiT / iBOT / DINOv2.

A mask is built from random rectangles (area >= 4 patches, aspect ratio in [0.3, 1/0.3]) until
the requested number of patches is covered. As the official collate does
(``dinov2/data/collate.py``), exactly ``int(probability * crops)`` of a batch's global crops are
masked, with ratios spread evenly over [0.1, 0.5]: masked crop i draws its ratio uniformly from
the i-th of equal bins, and which crops are masked is a random permutation. Two differences,
both for exact resume and for ``torchrun`` runs that equal one process: the plan is made for the
*global* batch from a generator seeded by (seed, iteration), and each crop's rectangles come from
its own generator seeded by (seed, iteration, crop), so a process builds only its own crops' masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """A boolean ``grid`` mask of rectangles with at most ``n_masked`` True cells.

    As the official ``MaskingGenerator``: each block's area is drawn between ``min_block`` and what
    is left (capped at half the grid), its aspect ratio log-uniformly; a block must be strictly
    smaller than the grid and add new cells without overshooting; ten failed tries end the mask,
    which can then hold a little less than asked.
    """
    h, w = grid
    mask = np.zeros(grid, dtype=bool)
    n_masked = min(n_masked, h * w)
    max_block = 0.5 * h * w  # dinov2/train/train.py: max_num_patches = 0.5 * tokens
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_block)
        added = 0
        for _ in range(max_tries):
            area = rng.uniform(min(min_block, budget), max(min_block, budget))
            ratio = math.exp(rng.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (0 < bh < h and 0 < bw < w):
                continue
            top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            block = mask[top : top + bh, left : left + bw]
            new = int((~block).sum())
            if 0 < new <= budget:
                block[:] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


@dataclass(frozen=True)
class MaskPlan:
    """Which global crops of one global batch are masked, and at what ratio (0: not masked).

    Crops are numbered view-major over the global batch: crop ``v * global_batch + position``.
    """

    ratios: np.ndarray  # (n_views * global_batch,)

    @classmethod
    def draw(
        cls, seed: int, iteration: int, n_crops: int, probability: float = 0.5, ratio: tuple[float, float] = (0.1, 0.5)
    ) -> MaskPlan:
        rng = np.random.default_rng([seed, iteration, _PLAN_STREAM])
        n_masked = int(probability * n_crops)
        edges = np.linspace(ratio[0], ratio[1], n_masked + 1)
        ratios = np.zeros(n_crops)
        ratios[rng.permutation(n_crops)[:n_masked]] = rng.uniform(edges[:-1], edges[1:])
        return cls(ratios)

    @staticmethod
    def row_bound(
        grid: tuple[int, int],
        n_crops: int,
        held: int,
        probability: float = 0.5,
        ratio: tuple[float, float] = (0.1, 0.5),
    ) -> tuple[int, int]:
        """Static upper bounds ``(width, rows)`` on the masked patches of one crop and of the ``held``
        crops a process holds, whatever the draw: shapes that never change let the kernels, the
        allocator and ``torch.compile`` reuse their work (as the official collate's ``upperbound``)."""
        n_masked = int(probability * n_crops)
        if n_masked == 0 or held == 0:
            return 0, 0
        n = grid[0] * grid[1]
        edges = np.linspace(ratio[0], ratio[1], n_masked + 1)
        per_crop = sorted((int(n * hi) for hi in edges[1:]), reverse=True)  # block_mask stays under int(n * r)
        return per_crop[0], sum(per_crop[: min(held, n_masked)])

    def masks(self, grid: tuple[int, int], crops: np.ndarray, seed: int, iteration: int) -> torch.Tensor:
        """Boolean masks (len(crops), gh * gw) for the given crop numbers only."""
        n = grid[0] * grid[1]
        out = np.zeros((len(crops), n), dtype=bool)
        for row, crop in enumerate(crops):
            r = self.ratios[crop]
            if r > 0:
                rng = np.random.default_rng([seed, iteration, int(crop)])
                out[row] = block_mask(grid, int(n * r), rng).reshape(-1)
        return torch.from_numpy(out)


_PLAN_STREAM = 7919  # keeps the plan's random stream apart from the per-crop ones


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per masked patch, 1 / (masked patches in its image): each image weighs the same in iBOT."""
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).float()
    return (1.0 / per_image).expand_as(masks)[masks]


def mask_selection(masks: torch.Tensor, width: int | None = None, n_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Where the masked patches are, as fixed-shape index tensors, built on the CPU by the collate.

    * ``mask_order`` (B, width): each crop's masked patch indices first, ascending, then padding:
      the queries of the last block (:meth:`VisionTransformer.forward_selected`);
    * ``mask_rows`` (n_rows,): the real entries of ``mask_order.flatten()``, padded with 0;
    * ``mask_weights`` (n_rows,): 1 / (masked patches of the row's crop), 0 on padding.

    Defaults are the tight sizes of this batch; the collate passes :meth:`MaskPlan.row_bound`.
    Nothing on the training device then waits for the host to count the masked patches.
    """
    counts = masks.sum(1)
    most = int(counts.max()) if len(masks) else 0
    width = most if width is None else width
    order = torch.sort((~masks).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width)[None] < counts[:, None]
    rows = valid.flatten().nonzero().squeeze(1)
    weights = mask_weights(masks)
    n_rows = len(rows) if n_rows is None else n_rows
    if len(rows) > n_rows or most > width:
        raise ValueError(f"{len(rows)} masked patches exceed the static bound of {n_rows} rows, {width} per crop")
    pad = n_rows - len(rows)
    return {
        "mask_order": order,
        "mask_rows": torch.cat([rows, rows.new_zeros(pad)]),
        "mask_weights": torch.cat([weights, weights.new_zeros(pad)]),
    }

"""Torch dataset, sampler and collate for pre-training.

Every random choice for a sample's crops (crops, flips, colour) is seeded by (seed, epoch, index);
the iBOT masks are planned per global batch, seeded by (seed, iteration) (see
:mod:`dinokit.data.masking`). The sampler yields a seeded permutation per epoch that can start at
any iteration, as keys ``(iteration, position in the global batch, index)``. Together they make a
resumed run see exactly the batches an uninterrupted run would have seen, and let ``torchrun``
processes split one global batch exactly the way a single process would.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dinokit.config import MaskConfig
from dinokit.data.har import Record
from dinokit.data.images import BadImage, load_rgb
from dinokit.data.masking import MaskPlan, mask_selection


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class MultiCropDataset(Dataset):
    """Sampler keys -> ``transform(image)`` + label; a bad image yields ``{"bad": (name, reason)}``.

    A key is an index (seeded by :meth:`set_epoch`), or ``(iteration, position, index, epoch)``
    from :class:`EpochSampler`; the iteration and position travel on to the collate, which plans
    the iBOT masks.
    """

    def __init__(self, records: Sequence[Record], transform: Callable, seed: int = 0) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, ...]) -> dict:
        # The epoch comes with the key: persistent workers hold a copy of the dataset made once.
        iteration, position, index, epoch = (
            (*key, self.epoch)[:4] if isinstance(key, tuple) else (None, None, key, self.epoch)
        )
        record = self.records[index]
        sample_seed = seed_of(self.seed, epoch, index)
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        try:
            image = load_rgb(record.source)
        except BadImage as exc:
            return {"bad": (record.name, str(exc))}
        views = self.transform(image)
        return {**views, "label": record.label, "index": index, "iteration": iteration, "position": position}


class MultiCropCollate:
    """Stack a batch view-major (all images' view 0, then view 1, ...), as DINOv2 does; drop bad
    samples; add the iBOT masks of this process's share of the global batch's plan."""

    def __init__(self, grid: tuple[int, int], masks: MaskConfig, seed: int, global_batch: int, n_global: int = 2):
        self.grid, self.cfg, self.seed = grid, masks, seed
        self.global_batch, self.n_global = global_batch, n_global

    def __call__(self, samples: list[dict]) -> dict:
        bad = [s["bad"] for s in samples if "bad" in s]
        good = [s for s in samples if "bad" not in s]
        if not good:
            return {"bad": bad, "size": 0}
        batch: dict = {
            "labels": torch.tensor([s["label"] for s in good]),
            "indices": torch.tensor([s["index"] for s in good]),
            "bad": bad,
            "size": len(good),
        }
        for key, value in good[0].items():
            if isinstance(value, list):  # crops (float, or uint8 for device augmentation): view-major
                batch[key] = torch.stack([s[key][v] for v in range(len(value)) for s in good])
            elif isinstance(value, torch.Tensor):  # e.g. a whole-image tensor
                batch[key] = torch.stack([s[key] for s in good])
        iteration = good[0]["iteration"] or 0
        positions = [i if s["position"] is None else s["position"] for i, s in enumerate(good)]
        plan = MaskPlan.draw(
            self.seed, iteration, self.n_global * self.global_batch, self.cfg.probability,
            (self.cfg.ratio_min, self.cfg.ratio_max),
        )  # fmt: skip
        crops = np.array([v * self.global_batch + p for v in range(self.n_global) for p in positions])
        batch["masks"] = plan.masks(self.grid, crops, self.seed, iteration)
        # bounds from the nominal batch (bad samples included): the same shapes every iteration
        width, rows = MaskPlan.row_bound(
            self.grid, self.n_global * self.global_batch, self.n_global * len(samples), self.cfg.probability,
            (self.cfg.ratio_min, self.cfg.ratio_max),
        )  # fmt: skip
        batch.update(mask_selection(batch["masks"], width, rows))
        return batch


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, cut into global batches; this rank takes its slice of each.

    It spans any range of iterations, across epochs (:meth:`set_range`): the training loop makes
    one pass over the whole run, so persistent loader workers never stop at an epoch boundary.
    A resumed run starts at its checkpoint's iteration without loading the batches before it.
    """

    def __init__(self, n: int, global_batch: int, iters: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if iters * global_batch > n:
            raise ValueError(f"{iters} iterations of {global_batch} need {iters * global_batch} images; have {n}")
        self.n, self.global_batch, self.iters = n, global_batch, iters
        self.seed, self.rank, self.world = seed, rank, world
        self.start, self.stop = 0, iters

    def set_range(self, start: int, stop: int) -> None:
        """Iterations ``start`` (inclusive) to ``stop`` (exclusive), counted from the run's first."""
        self.start, self.stop = start, stop

    def set_position(self, epoch: int, start_iter: int = 0) -> None:
        """The rest of one epoch, from its ``start_iter``-th batch."""
        self.set_range(epoch * self.iters + start_iter, (epoch + 1) * self.iters)

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        """Keys ``(iteration, position in the global batch, index, epoch)``."""
        local = self.global_batch // self.world
        first = self.rank * local
        perm, perm_epoch = None, -1
        for iteration in range(self.start, self.stop):
            epoch, b = divmod(iteration, self.iters)
            if epoch != perm_epoch:
                perm, perm_epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
            chunk = perm[b * self.global_batch : (b + 1) * self.global_batch]
            for position in range(first, first + local):
                yield iteration, position, int(chunk[position]), epoch

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * (self.global_batch // self.world)

"""Torch dataset, sampler and collate for pre-training.

Every random choice for a sample (crops, flips, colour, masks) is seeded by (seed, epoch, index),
and the sampler yields a seeded permutation per epoch that can start at any iteration. Together
they make a resumed run see exactly the batches an uninterrupted run would have seen, and let
``torchrun`` processes split one global batch exactly the way a single process would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dinokit.config import MaskConfig
from dinokit.data.crops import MultiCrop
from dinokit.data.har import Record
from dinokit.data.images import BadImage, load_rgb
from dinokit.data.masking import sample_masks


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class MultiCropDataset(Dataset):
    """Records -> multi-crop views + iBOT masks; a bad image yields ``{"bad": (name, reason)}``."""

    def __init__(
        self,
        records: Sequence[Record],
        transform: MultiCrop,
        grid: tuple[int, int],
        masks: MaskConfig,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.grid = grid
        self.masks = masks
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample_seed = seed_of(self.seed, self.epoch, index)
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        try:
            image = load_rgb(record.source)
        except BadImage as exc:
            return {"bad": (record.name, str(exc))}
        views = self.transform(image)
        rng = np.random.default_rng(sample_seed)
        masks = sample_masks(
            self.grid, len(views["global"]), rng, self.masks.probability, (self.masks.ratio_min, self.masks.ratio_max)
        )
        return {**views, "masks": masks, "label": record.label, "index": index}


def collate_multicrop(samples: list[dict]) -> dict:
    """Stack views view-major (all images' view 0, then view 1, …), as DINOv2 does; drop bad ones."""
    bad = [s["bad"] for s in samples if "bad" in s]
    good = [s for s in samples if "bad" not in s]
    if not good:
        return {"bad": bad, "size": 0}
    n_global, n_local = len(good[0]["global"]), len(good[0]["local"])
    batch = {
        "global": torch.stack([s["global"][v] for v in range(n_global) for s in good]),
        "masks": torch.stack([s["masks"][v] for v in range(n_global) for s in good]),
        "labels": torch.tensor([s["label"] for s in good]),
        "indices": torch.tensor([s["index"] for s in good]),
        "bad": bad,
        "size": len(good),
    }
    if n_local:
        batch["local"] = torch.stack([s["local"][v] for v in range(n_local) for s in good])
    return batch


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, cut into global batches; this rank takes its slice of each.

    ``start_iter`` skips the first batches of the epoch without loading them (resume).
    """

    def __init__(self, n: int, global_batch: int, iters: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if iters * global_batch > n:
            raise ValueError(f"{iters} iterations of {global_batch} need {iters * global_batch} images; have {n}")
        self.n, self.global_batch, self.iters = n, global_batch, iters
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.start_iter = 0, 0

    def set_position(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch, self.start_iter = epoch, start_iter

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        local = self.global_batch // self.world
        for b in range(self.start_iter, self.iters):
            chunk = perm[b * self.global_batch : (b + 1) * self.global_batch]
            yield from chunk[self.rank * local : (self.rank + 1) * local].tolist()

    def __len__(self) -> int:
        return (self.iters - self.start_iter) * (self.global_batch // self.world)

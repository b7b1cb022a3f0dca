"""Evaluation images as uint8, normalised on the device: the loader only decodes and resizes.

The old loader turned each image into float and normalised it on the CPU, one image at a time, in
the main process: 250 img/s on an H200 whose forward does 3,900. Here the loader hands over the
resized, centre-cropped uint8 pixels (4x fewer bytes to pin and copy) and :func:`normalize` does
the float conversion and ImageNet normalisation for the whole batch where the model runs. The
pixels are the old ones exactly: the resize works on the PIL image, which is uint8 already.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dinokit.data.crops import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from dinokit.data.har import Record
from dinokit.data.images import BadImage, load_rgb


def uint8_transform(size: int) -> v2.Compose:
    """:func:`eval_transform`'s geometry (its every step but the last, the float normalisation),
    ending in a (C, H, W) uint8 tensor, so the two can never drift apart."""
    steps = eval_transform(size).transforms
    return v2.Compose([*steps[:-1], v2.ToImage()])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ImageNet-normalised, on ``images``' device, with the per-image
    transform's float operations in its order (times 1/255, minus the mean, over the std): the same
    numbers to the bit (torchvision's ``to_dtype_image`` and ``normalize_image``)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, -1, 1, 1)
    return images.float().mul_(1.0 / 255).sub_(mean).div_(std)


class EvalImages(Dataset):
    """``(uint8 image or None, index, (name, reason) or None)`` per record: bad images are reported, not raised."""

    def __init__(self, records: Sequence[Record], size: int) -> None:
        self.records = list(records)
        self.transform = uint8_transform(size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            return self.transform(load_rgb(rec.source)), index, None
        except BadImage as exc:
            return None, index, (rec.name, str(exc))


def collate(items) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    """``(uint8 images, record indices, bad)``; ``None`` images when the whole batch was bad."""
    good = [i for i in items if i[0] is not None]
    bad = [i[2] for i in items if i[2] is not None]
    if not good:
        return None, None, bad
    return torch.stack([i[0] for i in good]), torch.tensor([i[1] for i in good]), bad


def default_batch_size(device: torch.device) -> int:
    """256 on a GPU (the forward, not memory, is the limit; an OOM halves it anyway), 128 on a CPU."""
    return 256 if device.type == "cuda" else 128


def usable_cpus() -> int:
    """Cores this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(device: torch.device, cpus: int | None = None) -> int:
    """Decoding processes beside the forward. On a GPU all cores but the main one (at most 8), so
    decoding keeps up with the forward. On a CPU none: the forward already keeps every core busy,
    and a worker only contends with it (1 worker: 0.41x of 0 workers on 2 cores,
    benchmarks/eval_extract_bench.py); the cache makes every later call decode-free anyway."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(0, min(8, cpus - 1)) if device.type == "cuda" else 0

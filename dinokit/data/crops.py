"""DINOv2 multi-crop augmentation on torchvision.transforms.v2.

Two global crops (scale 0.32-1) and N local crops (scale 0.05-0.32), each flipped, colour
jittered (p=0.8), greyscaled (p=0.2) and blurred; the second global crop is solarized with p=0.2.
Values from dinov2/data/augmentations.py. The blur is the official one at every crop size: a 9 px
kernel, sigma uniform in [0.1, 2.0] (dinov2/data/transforms.py, ``GaussianBlur``), on the 96 px
local crops as on the 224 px global ones.

Blur probabilities (``crops.blur_p``, global 1 / global 2 / local): dinokit follows the papers
(BYOL's asymmetric pair, kept by DINO and DINOv2), 1.0 / 0.1 / 0.5: one global view always
blurred, the other rarely but solarized sometimes. The official DINOv2 code *effectively* uses
0.0 / 0.9 / 0.5: its ``GaussianBlur(p)`` hands ``1 - p`` to ``RandomApply`` (dinov2 PR #411), and
the released checkpoints were trained that way. The kit teaches the method as published; set
``crops.blur_p=(0.0,0.9,0.5)`` to reproduce the official code's behaviour exactly.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_P = (1.0, 0.1, 0.5)  # global 1, global 2, local: the papers' values (see the module docstring)


def _normalize() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


BLUR_KERNEL = 9  # px, at every crop size (dinov2/data/transforms.py)
BLUR_SIGMA = (0.1, 2.0)


def _blur(p: float, sigma: tuple[float, float]) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=sigma)], p=p)


def _colour() -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


class MultiCrop:
    """Callable: PIL image -> ``{"global": [2 tensors], "local": [n tensors]}``."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        blur_p: tuple[float, float, float] = BLUR_P,
        blur_sigma: tuple[float, float] = BLUR_SIGMA,
    ) -> None:
        crop_g = v2.RandomResizedCrop(global_size, scale=global_scale, interpolation=v2.InterpolationMode.BICUBIC)
        crop_l = v2.RandomResizedCrop(local_size, scale=local_scale, interpolation=v2.InterpolationMode.BICUBIC)
        p1, p2, p_local = blur_p
        self.global1 = v2.Compose([crop_g, _colour(), _blur(p1, blur_sigma), _normalize()])
        self.global2 = v2.Compose(
            [crop_g, _colour(), _blur(p2, blur_sigma), v2.RandomSolarize(threshold=128, p=0.2), _normalize()]
        )
        self.local = v2.Compose([crop_l, _colour(), _blur(p_local, blur_sigma), _normalize()])
        self.n_local = n_local

    def __call__(self, image) -> dict[str, list[torch.Tensor]]:
        return {
            "global": [self.global1(image), self.global2(image)],
            "local": [self.local(image) for _ in range(self.n_local)],
        }


def eval_transform(size: int) -> v2.Compose:
    """Resize the short side to ``size`` / 0.875 and centre-crop ``size`` (the usual eval recipe)."""
    return v2.Compose(
        [
            v2.Resize(int(round(size / 0.875)), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            _normalize(),
        ]
    )


def whole_image_transform(size: int) -> v2.Compose:
    """Resize the whole image to ``size`` x ``size``, no crop: the geometry of DINO's attention maps
    (``visualize_attention.py``, default ``image_size=(480, 480)``), so a map covers all of the image."""
    return v2.Compose([v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC), _normalize()])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation, for drawing crops as the model sees them."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def fit_to_patches(image: Image.Image, size: int, patch: int) -> torch.Tensor:
    """The whole image resized to a square of ``size`` rounded down to a multiple of the patch size;
    normalised CHW. DINO's geometry, not the evaluation's centre crop: a map (and its Jaccard
    score) covers the whole image, borders included. Non-square images are squashed, as DINO's are."""
    size = max(patch, size - size % patch)
    return whole_image_transform(size)(image)

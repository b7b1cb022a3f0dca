"""Drawing self-attention maps of the CLS token, as in DINO's ``visualize_attention.py``.

The maps themselves come from :mod:`dinokit.models.cls_attention` (evaluation scores them too);
this module colours, overlays and batches them for figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.crops import fit_to_patches
from dinokit.models.cls_attention import cls_attention, mass_mask
from dinokit.models.vit import VisionTransformer


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps.float(), size=size, mode="nearest")


def head_colours(n: int) -> np.ndarray:
    import matplotlib

    return np.array([matplotlib.colormaps["tab10"](i % 10)[:3] for i in range(n)])


def head_overlay(image: np.ndarray, maps: torch.Tensor, mass: float = 0.6, alpha: float = 0.55) -> np.ndarray:
    """DINO Figure 3 style: each head's 60 %-mass region painted in its own colour over the image.

    ``image``: (H, W, 3) floats in [0, 1]; ``maps``: (heads, gh, gw) for that image.
    """
    h, w = image.shape[:2]
    masks = upsample(mass_mask(maps, mass)[None].float(), (h, w))[0].numpy()  # (heads, H, W)
    weights = upsample(maps[None], (h, w))[0].numpy() * masks
    colours = head_colours(maps.shape[0])
    winner = weights.argmax(0)
    covered = masks.any(0)
    paint = colours[winner]
    out = image.copy()
    out[covered] = (1 - alpha) * image[covered] + alpha * paint[covered]
    return out


def attention_for_records(
    backbone: VisionTransformer, images: Sequence[Image.Image], size: int, block: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, maps) for PIL images at ``size`` (a patch multiple is enforced)."""
    batch = torch.stack([fit_to_patches(img, size, backbone.patch_size) for img in images])
    return batch, cls_attention(backbone.eval(), batch, block)

"""Self-attention maps of the CLS token, as in DINO's ``visualize_attention.py``.

For the last block (or any block), the CLS query's attention over the patch tokens, per head
(register tokens excluded), computed with the ``naive`` backend for that forward only. The
"60 % mass" mask keeps the smallest set of patches that holds 60 % of a head's attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.crops import whole_image_transform
from dinokit.models.vit import VisionTransformer


def fit_to_patches(image: Image.Image, size: int, patch: int) -> torch.Tensor:
    """The whole image resized to a square of ``size`` rounded down to a multiple of the patch size;
    normalised CHW. DINO's geometry, not the evaluation's centre crop: a map (and its Jaccard
    score) covers the whole image, borders included. Non-square images are squashed, as DINO's are."""
    size = max(patch, size - size % patch)
    return whole_image_transform(size)(image)


@torch.no_grad()
def cls_attention(backbone: VisionTransformer, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """(B, heads, gh, gw) on the CPU: attention of the CLS token to each patch, per head.

    The forward runs on the backbone's device (the images are moved there).
    """
    device = next(backbone.parameters()).device
    attn = backbone.get_last_self_attention(images.to(device), block=block)  # (B, H, N, N)
    r = backbone.n_prefix_tokens
    gh, gw = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
    return attn[:, :, 0, r:].float().cpu().reshape(images.shape[0], -1, gh, gw)


def mass_mask(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Boolean masks keeping the smallest set of patches that holds ``mass`` of each map's total."""
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    values, order = flat.sort(dim=-1, descending=True)
    keep_sorted = values.cumsum(-1) - values < mass  # include the patch that crosses the threshold
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


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

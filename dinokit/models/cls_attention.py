"""Self-attention of the CLS token over the patches, per head, and its "60 % mass" mask.

For the last block (or any block), the CLS query's attention over the patch tokens, per head
(register tokens excluded), computed with the ``naive`` backend for that forward only (the fused
kernels never form the weights). The mass mask keeps the smallest set of patches that holds 60 %
of a head's attention. Model functions: evaluation scores them (Jaccard), figures draw them.
"""

from __future__ import annotations

import torch

from dinokit.models.vit import VisionTransformer


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

"""Does the CLS attention find the figure? The Jaccard index against the true silhouette.

As DINO measures on PASCAL VOC (Caron et al. 2021, Fig. 4): keep the smallest set of patches
holding 60 % of a head's CLS attention in the last block, upsample it to the image (nearest, patch
by patch), and compare with the object's mask: J = |attention ∩ figure| / |attention ∪ figure|,
averaged over images. The image is resized whole to a square, as DINO's ``visualize_attention.py``
does, not centre-cropped as for the probes: a crop would drop the image's borders, which are
background, and so score every model on a figure that fills more of what is left (random init's
near-uniform masks gain most). DINO reports the best head of each model; so does ``best``, beside every
head and the head average. The embedded dataset writes every figure's silhouette, so this runs on
held-out images of the demo; real HAR has no masks and gets no score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from dinokit.data.crops import fit_to_patches
from dinokit.data.har import Record
from dinokit.data.images import BadImage, load_rgb
from dinokit.data.synth import silhouette_path
from dinokit.models.cls_attention import cls_attention, mass_mask
from dinokit.models.patch_pca import patch_pca
from dinokit.models.vit import VisionTransformer


def silhouettes_of(root: str | Path, records: Sequence[Record]) -> list[Path] | None:
    """The silhouette file of every record, or None when the dataset has none (e.g. real HAR)."""
    out = [silhouette_path(root, r.name) for r in records]
    return out if out and all(p.is_file() for p in out) else None


def silhouette_at(path: Path, size: int) -> torch.Tensor:
    """The silhouette resized as the image is (the whole of it, to ``size`` x ``size``), as booleans."""
    resized = v2.Resize((size, size))(Image.open(path).convert("L"))
    return torch.from_numpy(np.asarray(resized) > 127)


def jaccard(attention_mask: torch.Tensor, figure: torch.Tensor) -> torch.Tensor:
    """Per image |A ∩ F| / |A ∪ F| for boolean masks (B, H, W)."""
    inter = (attention_mask & figure).flatten(1).sum(1).float()
    union = (attention_mask | figure).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


def _whole_images(records: Sequence[Record], silhouettes: Sequence[Path], size: int, patch: int):
    """Images resized whole (:func:`fit_to_patches`) and their silhouettes; unreadable images skipped."""
    images, masks = [], []
    for rec, sil in zip(records, silhouettes, strict=True):
        try:
            images.append(fit_to_patches(load_rgb(rec.source), size, patch))
        except BadImage:
            continue
        masks.append(silhouette_at(sil, size))
    return images, masks


def patch_grid_ceiling(silhouettes: Sequence[Path], size: int, patch: int) -> float:
    """Mean Jaccard index (%) of the best mask made of whole patches: what any patch-level mask
    (attention or patch PCA) could score at most at this image size, on the same images.

    Per image, the best such mask is a set of the most covered patches (include a patch when its
    covered share beats a threshold; the Dinkelbach argument), so it is found exactly by sorting
    patches by coverage and scoring every prefix.
    """
    size = max(patch, size - size % patch)
    area, scores = patch * patch, []
    for path in silhouettes:
        figure = silhouette_at(path, size).float()
        inside = F.avg_pool2d(figure[None, None], patch).flatten() * area  # figure pixels per patch
        inside = inside.sort(descending=True).values
        inter = inside.cumsum(0)
        union = figure.sum() + (area - inside).cumsum(0)
        scores.append(float((inter / union).max()) if figure.any() else 0.0)
    return 100.0 * float(np.mean(scores)) if scores else float("nan")


@torch.no_grad()
def attention_jaccard(
    backbone: VisionTransformer,
    records: Sequence[Record],
    silhouettes: Sequence[Path],
    size: int,
    mass: float = 0.6,
    batch_size: int = 64,
) -> dict:
    """Mean Jaccard index (%) between the 60 %-mass CLS attention mask and the figure:
    ``{"best": J of the best head, "best_head": its index, "heads": [J per head], "head_mean": J of
    the head-averaged map}``."""
    patch = backbone.patch_size
    size = max(patch, size - size % patch)
    per_head: list[torch.Tensor] = []
    for start in range(0, len(records), batch_size):
        end = start + batch_size
        images, masks = _whole_images(records[start:end], silhouettes[start:end], size, patch)
        if not images:
            continue
        maps = cls_attention(backbone.eval(), torch.stack(images))  # (B, H, gh, gw)
        maps = torch.cat([maps, maps.mean(1, keepdim=True)], dim=1)  # + the head average
        keep = F.interpolate(mass_mask(maps, mass).float(), size=(size, size), mode="nearest").bool()
        figure = torch.stack(masks)
        per_head.append(torch.stack([jaccard(keep[:, h], figure) for h in range(keep.shape[1])], dim=1))
    if not per_head:
        return {"best": float("nan"), "best_head": -1, "heads": [], "head_mean": float("nan")}
    scores = (100.0 * torch.cat(per_head).mean(0)).tolist()
    heads, head_mean = scores[:-1], scores[-1]
    best = max(range(len(heads)), key=heads.__getitem__)
    return {"best": heads[best], "best_head": best, "heads": heads, "head_mean": head_mean}


@torch.no_grad()
def pca_jaccard(
    backbone: VisionTransformer, records: Sequence[Record], silhouettes: Sequence[Path], size: int, group: int = 8
) -> float:
    """Mean Jaccard index (%) between the patch-PCA foreground (:func:`patch_pca`, fitted on
    ``group`` images at a time, as the report's figure) and the figure, on the same geometry as
    :func:`attention_jaccard`."""
    patch = backbone.patch_size
    size = max(patch, size - size % patch)
    device = next(backbone.parameters()).device
    scores: list[torch.Tensor] = []
    starts = list(range(0, len(records), group))
    if len(starts) > 1 and len(records) - starts[-1] == 1:
        starts.pop()  # a last image alone joins the group before it: every image is scored
    for start, end in zip(starts, [*starts[1:], len(records)], strict=True):
        images, masks = _whole_images(records[start:end], silhouettes[start:end], size, patch)
        if len(images) < 2:  # one image alone has no "several images at once" to fit on
            continue
        patches = backbone.eval().forward_features(torch.stack(images).to(device))["patch"].float().cpu()
        grid = (size // patch, size // patch)
        fg = patch_pca(patches, grid)["foreground"].unsqueeze(1).float()
        keep = F.interpolate(fg, size=(size, size), mode="nearest").bool()[:, 0]
        scores.append(jaccard(keep, torch.stack(masks)))
    return 100.0 * float(torch.cat(scores).mean()) if scores else float("nan")

"""``dinokit attention RUN_DIR``: CLS attention maps of a fixed set of held-out images, for every
block of the final teacher and the last block of every saved snapshot, and the PCA of their patch
features (DINOv2 Fig. 1) for the final teacher and random init, written to
``RUN_DIR/attention/maps.pt`` for the report, the video and notebook 06 (which never recompute
them)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dinokit import runs
from dinokit.data.crops import denormalize
from dinokit.data.images import load_rgb
from dinokit.data.source import prepare_split, resolve_data_root
from dinokit.device import resolve_device
from dinokit.models.cls_attention import cls_attention
from dinokit.models.patch_pca import patch_pca
from dinokit.models.ssl import random_init_backbone
from dinokit.viz.attention import attention_for_records


def pick_images(split, n: int) -> list:
    """One held-out image per class first (round robin), so the set is varied and fixed; without
    labels, the first unlabelled images by name."""
    if not split.val:
        return sorted(split.unlabeled, key=lambda r: r.name)[:n]
    by_class: dict[int, list] = {}
    for rec in sorted(split.val, key=lambda r: r.name):
        by_class.setdefault(rec.label, []).append(rec)
    picked, i = [], 0
    while len(picked) < n and any(len(v) > i for v in by_class.values()):
        for label in sorted(by_class):
            if len(by_class[label]) > i and len(picked) < n:
                picked.append(by_class[label][i])
        i += 1
    return picked


def compute_run_attention(
    run_dir: str | Path, n_images: int = 8, size: int | None = None, device: str | torch.device = "auto"
) -> Path:
    run_dir = Path(run_dir)
    device = resolve_device(device)
    cfg = runs.run_config(run_dir)
    split = prepare_split(cfg, progress=False)
    runs.check_data(run_dir, split.sha256, resolve_data_root(cfg))
    records = pick_images(split, n_images)
    size = size or cfg.crops.attention_image_size
    pil = [load_rgb(r.source) for r in records]
    final = runs.load_backbone(run_dir, device=device)
    images, maps = attention_for_records(final, pil, size)
    # every block of the final teacher, for the explorer: (blocks, images, heads, gh, gw)
    per_block = torch.stack([cls_attention(final, images, b) for b in range(len(final.blocks))])
    snapshots: dict[int, torch.Tensor] = {}
    backbone = random_init_backbone(cfg).to(device)  # a container of the right shape for each snapshot
    for path in tqdm(sorted((run_dir / runs.SNAPSHOTS).glob("teacher_*.pt")), desc="attention per snapshot"):
        backbone.load_state_dict(runs.load_checkpoint(path))
        snapshots[int(path.stem.split("_")[1])] = attention_for_records(backbone, pil, size)[1]
    random = random_init_backbone(cfg).to(device)
    snapshots[0] = attention_for_records(random, pil, size)[1]  # before training
    grid = tuple(maps.shape[-2:])
    pca = {}
    for name, model in (("teacher", final), ("random_init", random)):
        with torch.no_grad():
            patches = model.forward_features(images.to(device))["patch"].float().cpu()
        pca[name] = patch_pca(patches, grid)
    out = run_dir / "attention" / "maps.pt"
    runs.save_atomic(
        {
            "images": (torch.stack([denormalize(x) for x in images]) * 255).round().to(torch.uint8),
            "maps": maps,
            "blocks": per_block,
            "snapshots": {str(k): v for k, v in sorted(snapshots.items())},
            "pca": pca,
            "names": [r.name for r in records],
            "labels": [split.classes[r.label] if r.label >= 0 else "" for r in records],  # "": unlabelled
            "patch_size": final.patch_size,
            "iteration": runs.run_progress(run_dir)[0],  # of the checkpoint drawn
        },
        out,
    )
    return out

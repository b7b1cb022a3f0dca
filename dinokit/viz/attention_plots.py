"""Figures from ``RUN_DIR/attention/maps.pt`` and the Jaccard scores: for the report, notebook 06
and the video. Each takes saved data and returns a Figure."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt

from dinokit.models.cls_attention import mass_mask
from dinokit.viz.attention import head_overlay


def attention_figure(data: dict, n: int = 6):
    """Per image: the image, the head-averaged CLS attention, its 60 % mass mask, per-head overlay."""
    images = data["images"][:n].permute(0, 2, 3, 1).float().numpy() / 255
    maps = data["maps"][:n]
    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    for i, img in enumerate(images):
        mean = maps[i].mean(0)
        panels = [img, mean.numpy(), mass_mask(mean[None], 0.6)[0].float().numpy(), head_overlay(img, maps[i])]
        for j, (ax, panel) in enumerate(zip(axes[i], panels, strict=True)):
            ax.imshow(panel, cmap=None if j in (0, 3) else "inferno")
            ax.axis("off")
        axes[i, 0].set_title(data["labels"][i], fontsize=8)
    for ax, title in zip(axes[0, 1:], ("mean over heads", "60 % mass", "heads (colours)"), strict=True):
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def snapshots_figure(data: dict, image: int = 0):
    """How one image's head-averaged CLS attention sharpens across checkpoints."""
    snaps = data["snapshots"]
    fig, axes = plt.subplots(1, len(snaps) + 1, figsize=(1.8 * (len(snaps) + 1), 2.2), squeeze=False)
    axes[0, 0].imshow(data["images"][image].permute(1, 2, 0).numpy())
    axes[0, 0].set_title(data["labels"][image], fontsize=8)
    for ax, (it, maps) in zip(axes[0, 1:], snaps.items(), strict=True):
        ax.imshow(maps[image].mean(0).numpy(), cmap="inferno")
        ax.set_title("random init" if it == "0" else f"iter {int(it)}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def pca_figure(data: dict, n: int = 6):
    """DINOv2 Fig. 1 style: per image, the foreground found by the first patch-PCA component and the
    next three components as RGB, for the final teacher and for random init."""
    images = data["images"][:n].permute(0, 2, 3, 1).numpy()
    models = [m for m in ("teacher", "random_init") if m in data.get("pca", {})]
    fig, axes = plt.subplots(len(images), 1 + 2 * len(models), figsize=(1.6 * (1 + 2 * len(models)), 1.6 * len(images)),
                             squeeze=False)  # fmt: skip
    for i, img in enumerate(images):
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(data["labels"][i], fontsize=7)
        for j, name in enumerate(models):
            pca = data["pca"][name]
            axes[i, 1 + 2 * j].imshow(pca["foreground"][i].numpy(), cmap="gray")
            axes[i, 2 + 2 * j].imshow(pca["rgb"][i].numpy())
            if i == 0:
                who = "pre-trained" if name == "teacher" else "random init"
                axes[0, 1 + 2 * j].set_title(f"{who}: foreground", fontsize=7)
                axes[0, 2 + 2 * j].set_title(f"{who}: PCA RGB", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def jaccard_figure(jaccard: Mapping) -> plt.Figure:
    """Jaccard of the 60 %-mass attention with the figure, across checkpoints, against random init."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    snaps = sorted((int(k), v) for k, v in jaccard.get("snapshots", {}).items())
    if snaps:
        ax.plot([k for k, _ in snaps], [v for _, v in snaps], marker="o", label="pre-trained teacher (snapshots)")
    ax.axhline(jaccard["random_init"], color="C1", linestyle="--", label="random init")
    if "supervised" in jaccard:
        ax.axhline(jaccard["supervised"], color="C2", linestyle=":", label="supervised reference")
    ax.axhline(2 * jaccard["random_init"], color="gray", linestyle=":", linewidth=0.8, label="2 x random init")
    ax.set_xlabel("iteration")
    ax.set_ylabel("Jaccard with the figure (%)")
    ax.set_ylim(0, max([v for _, v in snaps] + [2 * jaccard["random_init"], jaccard["teacher"]]) * 1.2 + 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

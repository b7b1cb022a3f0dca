"""Baselines that tell whether pre-training helped: a random network of the same shape."""

from __future__ import annotations

import torch

from dinokit.config import Config
from dinokit.models.ssl import build_architecture
from dinokit.models.vit import VisionTransformer


def random_init_backbone(cfg: Config, seed: int | None = None) -> VisionTransformer:
    """The run's architecture with fresh random weights (the run's own seed by default)."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return build_architecture(cfg.model, cfg.crops.global_size).backbone.eval()

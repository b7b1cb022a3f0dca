"""Initialise a dinokit ViT from the official DINOv2 weights (via timm), at any patch size.

DINOv2 ships patch-14 models with 37x37 position embeddings (518 px). For a patch-8 model the
patch embedding kernel is resampled to 8x8 (timm's ``resample_patch_embed``, pseudo-inverse
resize, FlexiViT) and the position embeddings to the model's grid (bicubic). Weights cannot be
downloaded on every machine: set ``DINOKIT_DINOV2_WEIGHTS`` to a local ``.safetensors`` / ``.pth``
file, or run once with internet so timm caches them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.layers import resample_patch_embed

from dinokit.models.pos_embed import interpolate_pos_embed
from dinokit.models.vit import VisionTransformer

TIMM_NAMES = {
    "vit_small": "vit_small_patch14_dinov2.lvd142m",
    "vit_base": "vit_base_patch14_dinov2.lvd142m",
}


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from a file without running code (safetensors, or torch weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def official_dinov2_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The official DINOv2 backbone weights for ``arch``, or a clear error saying how to get them."""
    local = os.environ.get("DINOKIT_DINOV2_WEIGHTS")
    if local:
        return load_state_file(local)
    if arch not in TIMM_NAMES:
        raise ValueError(f"no official DINOv2 weights for {arch!r}; available for {', '.join(TIMM_NAMES)}")
    import timm

    try:
        return timm.create_model(TIMM_NAMES[arch], pretrained=True).state_dict()
    except Exception as exc:  # network errors come in many types (OSError, HF hub errors, …)
        raise RuntimeError(
            f"could not download the DINOv2 weights {TIMM_NAMES[arch]} ({type(exc).__name__}: {exc}). "
            "Download them on a machine with internet (timm caches them under ~/.cache/huggingface), "
            "or point DINOKIT_DINOV2_WEIGHTS at a local .safetensors/.pth file, or use model.init=random."
        ) from exc


def load_timm_vit_weights(model: VisionTransformer, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a timm ViT / DINOv2 state dict into ``model``, resampling patch and position embeddings.

    Returns the names of ``model`` parameters that the state dict did not provide.
    """
    state = dict(state)
    weight = state["patch_embed.proj.weight"]
    if weight.shape[-1] != model.patch_size:
        state["patch_embed.proj.weight"] = resample_patch_embed(weight, [model.patch_size] * 2)
    pos = state["pos_embed"]
    n_patches = pos.shape[1] - 1
    old = int(round(n_patches**0.5))
    if (old, old) != tuple(model.grid):
        # DINOv2's own formula: the model at its img_size sees the positions the official code uses there
        state["pos_embed"] = interpolate_pos_embed(pos, (old, old), tuple(model.grid))
    if model.reg_token is None:
        state.pop("reg_token", None)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"checkpoint does not match this ViT; unexpected keys such as {unexpected[:5]}")
    mismatched = [k for k, v in state.items() if own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"checkpoint does not match this ViT: {k} is {tuple(state[k].shape)}, model wants {tuple(own[k].shape)} "
            "(check model.arch / embed_dim)"
        )
    missing = model.load_state_dict(state, strict=False).missing_keys
    return missing

"""Optimizer parameter groups with lr / weight-decay multipliers (as dinov2/utils/param_groups.py).

* layer-wise lr decay: block i of L gets decay^(L + 1 - (i + 1)); embeddings decay^(L + 1);
  the final norm and the heads get 1;
* the patch embedding gets an extra multiplier (DINOv2: 0.2);
* no weight decay on biases, norms and LayerScale gammas, matched by name as the official code
  does (``.bias``, ``norm``, ``gamma``); the cls / register / mask / position tokens and the
  prototypes' norm scale g *are* decayed there, and so here;
* the prototype layer is its own group so it can be frozen for the first epoch.
"""

from __future__ import annotations

from torch import nn

_TOKENS = ("cls_token", "reg_token", "mask_token", "pos_embed")


def decays(name: str) -> bool:
    """Weight decay applies unless the parameter is a bias, a norm or a LayerScale gamma (as DINOv2)."""
    return not (name.endswith(".bias") or "norm" in name or "gamma" in name)


def layer_id(name: str, depth: int) -> int:
    name = name.removeprefix("module.").removeprefix("backbone.")
    if name.startswith(_TOKENS) or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def build_param_groups(
    model: nn.Module, depth: int, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = layerwise_decay ** (depth + 1 - layer_id(name, depth))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        is_last_layer = "last_layer" in name
        key = (lr_mult, 1.0 if decays(name) else 0.0, is_last_layer)
        group = groups.setdefault(
            key, {"params": [], "names": [], "lr_mult": key[0], "wd_mult": key[1], "is_last_layer": key[2]}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_mult"]
        group["weight_decay"] = wd * group["wd_mult"]

"""Student / teacher network: backbone + DINO head (+ iBOT head), one forward for DDP."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dinokit.config import Config, ModelConfig
from dinokit.models.heads import DINOHead
from dinokit.models.vit import VisionTransformer, build_vit


class SSLModel(nn.Module):
    def __init__(self, backbone: VisionTransformer, dino_head: DINOHead, ibot_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head  # None: iBOT shares the DINO head (DINOv2's default)

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        mask_input: bool = True,
        order: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Student: ``mask_input=True`` hides masked patches. Teacher: ``False``, sees them all.

        Either way the iBOT head embeds the tokens at the masked positions: ``order`` and ``rows``
        from :func:`dinokit.data.masking.mask_selection`. Returns the heads' normalised embeddings
        (``dino_global``, ``dino_local``, ``ibot``) and their prototype matrices; the losses form
        the logits chunk by chunk (:mod:`dinokit.losses.prototype_ce`). The heads run in the
        autocast dtype, as everything else; softmax and cross-entropy stay fp32 in the losses.
        """
        g = self.backbone.forward_selected(global_crops, masks if mask_input else None, order)
        out = {"cls": g["cls"], "dino_global": self.dino_head.embed(g["cls"])}
        out["dino_prototypes"] = self.dino_head.prototypes()
        if local_crops is not None:
            out["dino_local"] = self.dino_head.embed(self.backbone.forward_selected(local_crops)["cls"])
        if rows is not None:
            head = self.ibot_head or self.dino_head
            out["ibot"] = head.embed(g["patch"].flatten(0, 1)[rows])
            out["ibot_prototypes"] = head.prototypes() if self.ibot_head is not None else out["dino_prototypes"]
        return out


def build_ssl_model(cfg: ModelConfig, img_size: int) -> SSLModel:
    backbone = build_vit(
        cfg.arch,
        patch_size=cfg.patch_size,
        img_size=img_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        n_registers=cfg.n_registers,
        layerscale=cfg.layerscale,
        drop_path=cfg.drop_path,
        drop_path_uniform=cfg.drop_path_uniform,
        efficient_drop_path=cfg.efficient_drop_path,
        attention=cfg.attention,
    )
    if cfg.init == "dinov2":
        from dinokit.models.pretrained import load_timm_vit_weights, official_dinov2_state_dict

        load_timm_vit_weights(backbone, official_dinov2_state_dict(cfg.arch))
    elif cfg.init != "random":
        raise ValueError(f"model.init must be 'random' or 'dinov2', got {cfg.init!r}")

    def head() -> DINOHead:
        return DINOHead(
            backbone.embed_dim, cfg.head_prototypes, cfg.head_hidden, cfg.head_bottleneck,
            freeze_norm=cfg.head_norm_last_layer,
        )  # fmt: skip

    return SSLModel(backbone, head(), head() if cfg.ibot_separate_head else None)


def build_architecture(cfg: ModelConfig, img_size: int) -> SSLModel:
    """The same network with fresh random weights and no download, whatever ``cfg.init`` says:
    a container for loading a checkpoint, or the random-init baseline."""
    return build_ssl_model(dataclasses.replace(cfg, init="random"), img_size)


def random_init_backbone(cfg: Config, seed: int | None = None) -> VisionTransformer:
    """The run's architecture with fresh random weights (the run's own seed by default): the
    baseline that tells whether pre-training helped, for evaluation and figures alike."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return build_architecture(cfg.model, cfg.crops.global_size).backbone.eval()

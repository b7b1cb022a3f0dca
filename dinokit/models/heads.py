"""The DINO projection head: MLP -> L2 normalisation -> weight-normalised prototypes.

As in DINO / DINOv2 (dinov2/layers/dino_head.py): 3 layers with GELU, a bottleneck, then a
weight-normalised linear layer onto K prototypes, W = g * V / ||V||. The scale g starts at 1.

* DINOv2 (the default, ``freeze_norm=False``): g is trained (and weight-decayed, as every
  parameter whose name is not a bias, norm or LayerScale gamma), so a prototype's logits can grow.
* DINO v1 (``freeze_norm=True``, its ``norm_last_layer=True``): g stays 1, the prototypes only
  rotate and the logits are exact cosines. DINO reports this as more stable for small ViTs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        freeze_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if freeze_norm:  # DINO v1's norm_last_layer=True
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """MLP then L2 normalisation: the (M, bottleneck) fp32 rows the prototypes score.

        The MLP runs in the autocast dtype (tensor cores); the normalised output is fp32.
        """
        return F.normalize(self.mlp(x).float(), dim=-1, p=2, eps=1e-12)

    def prototypes(self) -> torch.Tensor:
        """The (K, bottleneck) prototype matrix W = g * V / ||V|| (weight norm applied)."""
        return self.last_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``embed(x) W^T``. Training never forms them whole: the losses take
        ``embed`` and ``prototypes`` (see :mod:`dinokit.losses.prototype_ce`)."""
        return F.linear(self.embed(x), self.prototypes())

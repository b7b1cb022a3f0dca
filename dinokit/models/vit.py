"""The ViT backbone, built from timm layers, with what DINOv2 needs on top.

* any image size (position embeddings interpolated per input, so 224 px global and 96 px local
  crops share weights), a learnable mask token for iBOT, optional register tokens, LayerScale;
* stochastic depth either as timm's ``DropPath`` (zero the branch for dropped samples) or as
  DINOv2 does it: compute the branch only for the kept samples (``efficient_drop_path``);
* output ``{"cls", "patch", "reg", "prenorm"}`` and ``get_intermediate_layers`` for the probes;
* parameter names as in timm, so timm / DINOv2 state dicts load (see :mod:`dinokit.models.pretrained`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinokit.models.attention import Attention, check_backend, set_attention_backend
from dinokit.models.lean_branch import compute_dtype, norm_linear, norm_mlp, scaled_weights
from dinokit.models.pos_embed import interpolate_pos_embed

# name -> (embed_dim, depth, num_heads)
ARCHS = {
    "vit_pico": (48, 2, 2),  # tests only
    "vit_mini": (128, 4, 4),  # the CPU demo
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),  # ViT-S: the assignment's model
    "vit_base": (768, 12, 12),
}


def _drop_add_residual_subset(
    x: torch.Tensor,
    branch: Callable[..., torch.Tensor],
    drop_rate: float,
    inputs: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Stochastic depth that skips the compute of dropped samples (DINOv2's efficient variant).

    ``branch(*inputs)`` (default ``branch(x)``) is computed for the kept samples and added to ``x``.
    """
    b = x.shape[0]
    keep = max(int(b * (1 - drop_rate)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]
    residual = branch(*(t[idx] for t in (inputs or (x,))))
    scale = b / keep  # unbiased: E[update] equals the full residual
    # index_put, not index_add: index_add keeps its (fp32) source for the backward, this only idx
    update = residual.to(x.dtype).flatten(1) * scale
    return x.flatten(1).index_put((idx,), update, accumulate=True).view_as(x)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layerscale: float = 0.0,
        drop_path: float = 0.0,
        efficient_drop_path: bool = True,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=backend)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path_rate = drop_path
        self.efficient_drop_path = efficient_drop_path
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.lean = False  # see _lean: training turns it on where it pays (lean_branches_pay)

    def _lean(self) -> bool:
        """Memory-lean branches (:mod:`dinokit.models.lean_branch`) wherever autograd records; a
        compiled block leaves what to keep to the compiler."""
        return self.lean and torch.is_grad_enabled()

    def _attn_branch(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        if self._lean():
            proj = scaled_weights(self.attn.proj, self.ls1, compute_dtype(x))
            return self.attn.attend(norm_linear(x, self.norm1, self.attn.qkv), queries, proj)
        return self.ls1(self.attn(self.norm1(x), queries))

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self._lean():
            return norm_mlp(x, self.norm2, self.mlp, self.ls2)
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``queries`` (b, m) token indices: compute the block's output for those tokens only, (b, m, c).

        Exact for them: every token still serves as a key and value. The same random draws
        as the full block, so stochastic depth drops the same samples.
        """
        x_out = x if queries is None else x.gather(1, queries[..., None].expand(-1, -1, x.shape[-1]))
        if self.training and self.drop_path_rate > 0 and self.efficient_drop_path:
            inputs = (x,) if queries is None else (x, queries)
            x_out = _drop_add_residual_subset(x_out, self._attn_branch, self.drop_path_rate, inputs)
            return _drop_add_residual_subset(x_out, self._mlp_branch, self.drop_path_rate)
        x_out = x_out + self.drop_path(self._attn_branch(x, queries))
        return x_out + self.drop_path(self._mlp_branch(x_out))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 8,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        n_registers: int = 0,
        layerscale: float = 1e-5,
        drop_path: float = 0.0,
        drop_path_uniform: bool = True,
        efficient_drop_path: bool = True,
        attention: str = "sdpa",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_backend(attention)
        self.grad_checkpointing = grad_checkpointing
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.n_registers = n_registers
        self.patch_embed = PatchEmbed(
            img_size, patch_size, 3, embed_dim, output_fmt="NHWC", strict_img_size=False, flatten=False
        )
        self.grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, n_registers, embed_dim)) if n_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        # Stochastic depth: the same rate in every block (DINOv2's default, drop_path_uniform: true),
        # or growing linearly from 0 in the first block to ``drop_path`` in the last.
        rates = [drop_path if drop_path_uniform else drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, layerscale, r, efficient_drop_path, attention) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.n_registers

    def set_attention_backend(self, backend: str) -> VisionTransformer:
        return set_attention_backend(self, backend)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patchify, swap masked patches for the mask token, add (interpolated) positions."""
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (b, gh, gw, d)
        gh, gw = x.shape[1:3]
        x = x.reshape(b, gh * gw, -1)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        pos = interpolate_pos_embed(self.pos_embed, self.grid, (gh, gw))  # as DINOv2, offset included
        cls = self.cls_token.expand(b, -1, -1) + pos[:, :1]
        tokens = [cls]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(b, -1, -1))
        tokens.append(x + pos[:, 1:])
        return torch.cat(tokens, dim=1)

    def _run_block(self, block: Block, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """One block; with activation checkpointing while training, only its input is kept and the
        rest recomputed in the backward (~1/3 more compute, a fraction of the memory; what lets the
        naive path fit)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, queries, use_reentrant=False)
        return block(x, queries)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.prepare_tokens(x, masks)
        for block in self.blocks:
            x = self._run_block(block, x)
        out = self.norm(x)
        r = self.n_prefix_tokens
        return {"cls": out[:, 0], "reg": out[:, 1:r], "patch": out[:, r:], "prenorm": x}

    def forward_selected(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, order: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The training forward (and evaluation's CLS features): ``{"cls": (b, d), "patch": (b, w, d)}``,
        the patch tokens at the positions ``order`` (b, w) (from
        :func:`dinokit.data.masking.mask_selection`; none: w = 0).

        The losses read only these (CLS for DINO and KoLeo, masked patches for iBOT), so the
        last block computes its output for them alone; the other tokens are still its keys and
        values. The same numbers as the full forward, for fewer FLOPs: all of the last block's
        projection and MLP but one token on local crops and on DINO-only runs. Shapes depend
        only on ``order``'s, never on how many patches are masked: no host sync.
        """
        tokens = self.prepare_tokens(x, masks)
        *body, last = self.blocks
        for block in body:
            tokens = self._run_block(block, tokens)
        queries = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
        if order is not None:
            queries = torch.cat([queries, order + self.n_prefix_tokens], dim=1)
        out = self.norm(self._run_block(last, tokens, queries))
        return {"cls": out[:, 0], "patch": out[:, 1:]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int = 1, norm: bool = True
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(patch tokens, cls token)`` of the last ``n`` blocks, as DINOv2's linear probes use."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x) if norm else x)
        r = self.n_prefix_tokens
        return [(o[:, r:], o[:, 0]) for o in outputs]

    @torch.no_grad()
    def get_last_self_attention(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """Attention weights ``(b, heads, tokens, tokens)`` of one block, via the naive backend."""
        target = self.blocks[block].attn
        saved = target.backend
        target.backend, target.keep_attention = "naive", True
        try:
            x = self.prepare_tokens(x)
            for blk in self.blocks[: (block % len(self.blocks)) + 1]:
                x = blk(x)
            return target.last_attention
        finally:
            target.backend, target.keep_attention, target.last_attention = saved, False, None


def build_vit(
    arch: str = "vit_small",
    patch_size: int = 8,
    img_size: int = 224,
    embed_dim: int = 0,
    depth: int = 0,
    num_heads: int = 0,
    **kwargs,
) -> VisionTransformer:
    """Build a ViT by name; explicit ``embed_dim``/``depth``/``num_heads`` override the name."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    d, n, h = ARCHS[arch]
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim or d,
        depth=depth or n,
        num_heads=num_heads or h,
        **kwargs,
    )

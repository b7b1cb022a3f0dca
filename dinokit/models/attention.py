"""Multi-head self-attention with a backend that can be switched at run time.

* ``naive``: softmax(QK^T / sqrt(d)) V written out. It materialises the N x N matrix; it is
  "FlashAttention off" in the speed study and the only backend that can return the weights.
* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` restricted to the best IO-aware kernel the
  device has for the input ("FlashAttention on"): FlashAttention-2 on sm80+ GPUs in fp16/bf16, the
  memory-efficient kernel on other GPUs and in fp32, the tiled flash kernel on the CPU. The choice is
  :func:`dinokit.models.kernels.choose_sdpa_kernel`.
* ``sdpa-efficient`` / ``sdpa-math``: SDPA's other kernels, for reference in the speed study.
* ``flash-attn``: the Dao-AILab package (CUDA sm80+, fp16/bf16), only when it is installed.

Parameter names follow timm (``qkv``, ``proj``) so timm and DINOv2 checkpoints load directly.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinokit.models.kernels import KERNELS, sdpa_kernel_for

BACKENDS = ("naive", "sdpa", "sdpa-efficient", "sdpa-math", "flash-attn")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def check_backend(name: str) -> None:
    """Raise a clear error for an unknown or unavailable backend."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash-attn" and not flash_attn_available():
        raise ValueError(
            "attention backend 'flash-attn' needs a CUDA GPU and the flash-attn package "
            "(pip install -r requirements-gpu.txt); use 'sdpa' for PyTorch's built-in flash kernel"
        )


def _sdpa_context(backend: str, q: torch.Tensor) -> contextlib.AbstractContextManager:
    if backend == "sdpa-math":
        return sdpa_kernel([SDPBackend.MATH])
    if backend == "sdpa-efficient":
        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    return sdpa_kernel([KERNELS[sdpa_kernel_for(q)]])


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend
        self.keep_attention = False  # naive backend only: store the last attention weights
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``queries`` (b, m) token indices: only those tokens attend (to all n), giving (b, m, c).

        The training forward uses it in the last block, whose other outputs no loss reads. Such a
        call runs PyTorch's SDPA kernel even with ``flash-attn`` (its packed-QKV function needs the
        same length for queries and keys).
        """
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        if self.backend == "flash-attn" and queries is None:
            from flash_attn import flash_attn_qkvpacked_func

            out = flash_attn_qkvpacked_func(qkv, softmax_scale=self.scale)  # (b, n, h, d)
            return self.proj(out.reshape(b, n, c))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, n, d)
        if queries is not None:
            index = queries[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim)
            q, n = q.gather(2, index), queries.shape[1]
        if self.backend == "naive":
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            if self.keep_attention:
                self.last_attention = attn.detach()
            out = attn @ v
        else:
            with _sdpa_context(self.backend, q):
                out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every attention layer of ``model`` to ``backend`` (works on a built model)."""
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
    return model


def get_attention_backend(model: nn.Module) -> str:
    backends = {m.backend for m in model.modules() if isinstance(m, Attention)}
    return backends.pop() if len(backends) == 1 else "mixed"

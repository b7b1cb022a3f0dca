"""Multi-head self-attention with a backend that can be switched at run time.

* ``naive``: softmax(QK^T / sqrt(d)) V written out. It materialises the N x N matrix; it is
  "FlashAttention off" in the speed study and the only backend that can return the weights.
* ``sdpa``: "FlashAttention on": PyTorch's ``scaled_dot_product_attention`` restricted to the fused
  exact kernels the device has, fastest first: cuDNN attention or FlashAttention-2 on sm80+ GPUs in
  fp16/bf16 (whichever a one-time timing finds faster, for inference and for training separately),
  the memory-efficient kernel on older GPUs and in fp32, the tiled flash kernel on the CPU. The
  choice is :mod:`dinokit.models.kernels`.
* ``sdpa-efficient`` / ``sdpa-math``: SDPA's other kernels, for reference in the speed study.
* ``flash-attn``: the Dao-AILab package (CUDA sm80+, fp16/bf16), only when it is installed:
  FlashAttention-3 on Hopper when ``flash_attn_interface`` is there, else FlashAttention-2.

Parameter names follow timm (``qkv``, ``proj``) so timm and DINOv2 checkpoints load directly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinokit.device import DeviceKind, device_kind
from dinokit.models import kernels

BACKENDS = ("naive", "sdpa", "sdpa-efficient", "sdpa-math", "flash-attn")


def flash_attn_problem_here() -> str | None:
    """Why ``flash-attn`` cannot run on this machine's GPU (the CPU where there is none); None: it can."""
    kind = device_kind("cuda") if torch.cuda.is_available() else DeviceKind("cpu")
    return kernels.flash_attn_problem(kind)


def flash_attn_available() -> bool:
    return flash_attn_problem_here() is None


def check_backend(name: str) -> None:
    """Raise a clear error for an unknown or unavailable backend."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash-attn" and (problem := flash_attn_problem_here()):
        raise ValueError(problem)


def _sdpa_context(backend: str, q: torch.Tensor) -> contextlib.AbstractContextManager:
    if backend == "sdpa-math":
        return sdpa_kernel([SDPBackend.MATH])
    if backend == "sdpa-efficient":
        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    return kernels.sdpa_context(q)


def flash_attn_package(qkv: torch.Tensor, queries: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The Dao-AILab kernels on packed ``qkv`` (b, n, 3, h, d): (b, m, h, d) for the m ``queries`` (all n
    if None). Both versions take fewer queries than keys, so the training's last block stays on them."""
    kernel = kernels.flash_attn_kernel_for(qkv.device)
    if kernel == "flash-attn" and queries is None:
        from flash_attn import flash_attn_qkvpacked_func

        return flash_attn_qkvpacked_func(qkv, softmax_scale=scale)  # backward writes one packed gradient
    q, k, v = qkv.unbind(2)
    if queries is not None:
        q = q.gather(1, queries[:, :, None, None].expand(-1, -1, *q.shape[2:]))
    if kernel == "flash-attn-3":
        from flash_attn_interface import flash_attn_func
    else:
        from flash_attn import flash_attn_func
    out = flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # early FlashAttention-3 releases also return the LSE


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

        The training forward uses it in the last block, whose other outputs no loss reads. Every
        backend takes such a call (with ``sdpa``, a kernel that cannot hands it to the next in line).
        """
        return self.attend(self.qkv(x), queries)

    def attend(self, qkv: torch.Tensor, queries: torch.Tensor | None = None, proj: tuple | None = None) -> torch.Tensor:
        """Attention and the output projection from the qkv projection's output (b, n, 3c).

        ``proj``: (weight, bias) to use instead of ``self.proj``'s (a block folds its LayerScale in).
        """
        b, n, c3 = qkv.shape
        c = c3 // 3
        weight, bias = proj or (self.proj.weight, self.proj.bias)
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim)
        if self.backend == "flash-attn":
            out = flash_attn_package(qkv, queries, self.scale)  # (b, m, h, d)
            return F.linear(out.reshape(b, out.shape[1], c), weight, bias)
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
        return F.linear(out.transpose(1, 2).reshape(b, n, c), weight, bias)


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

"""Memory-lean block branches: autograd keeps the 16-bit input and the matmul outputs, and
recomputes the cheap elementwise parts in the backward.

Why: a training step's peak memory is what autograd saves for the backward, and nearly all of it
is the blocks' activations (H200: 50 GB at batch 64, issue 19). Per token and block, eager
PyTorch under autocast keeps each LayerNorm's fp32 input *and* its 16-bit output (the next
matmul's input), GELU's input *and* output (fc2's input), and each LayerScale's input. A fused
(compiled) block keeps only what a matmul cannot cheaply give back. These two functions do the
same in eager mode, on every device:

* :func:`norm_linear`: LayerNorm, then a Linear (the attention's qkv). Keeps the input, in the
  compute dtype; the normalised tensor is recomputed in the backward.
* :func:`norm_mlp`: LayerNorm, fc1, GELU, fc2 (the MLP). Keeps the input and fc1's output;
  the normalised input and the GELU are recomputed.

LayerScale is folded into the branch's last matmul (:func:`scaled_weights`), so its input is not
kept either. Under bf16/fp16 autocast the kept input is rounded to 16 bits (bf16 in both: fp16
would overflow on a large residual), as DINOv2's own mixed precision runs the whole block (FSDP
``param_dtype``); the input's gradient stays fp32. In fp32 and fp64 the values and
gradients equal the plain modules' up to rounding (the folded LayerScale multiplies earlier);
tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def lean_branches_pay(device_type: str) -> bool:
    """Whether a training step on ``device_type`` should use the lean branches.

    On GPUs (and other accelerators) the saved activations set the peak memory, hence the batch
    that fits; recomputing a LayerNorm and a GELU is cheap beside the matmuls. On the CPU memory is
    plentiful and the recompute is not free: a ``cpu-demo`` step ran at 0.87x with them
    (``benchmarks/step_vs_commit.py`` against f12e459, 2-core EPYC, fp32)."""
    return device_type != "cpu"


def set_lean_branches(backbone: nn.Module, on: bool) -> None:
    """Turn the lean branches on or off in every block of ``backbone``."""
    for module in backbone.modules():
        if hasattr(module, "lean"):
            module.lean = on


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in (``x``'s own dtype without autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def scaled_weights(linear: nn.Linear, scale: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``linear`` followed by LayerScale ``scale`` as one weight and bias (gamma folded in, in
    fp32, then cast to the compute ``dtype`` as autocast would cast the weight)."""
    gamma = getattr(scale, "gamma", None)
    if gamma is None:  # no LayerScale
        return linear.weight, linear.bias
    bias = None if linear.bias is None else (linear.bias * gamma).to(dtype)
    return (linear.weight * gamma[:, None]).to(dtype), bias


def _layer_norm(x: torch.Tensor, norm: tuple, dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm in fp32 (as autocast runs it), returned in the matmul dtype."""
    return _layer_norm_with_stats(x, norm, x.dtype, dtype)[0]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _linear_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool) -> tuple:
    """Gradients of ``x @ weight.T + bias`` for input, weight and bias, in the compute dtype."""
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = (g2 @ weight.to(g2.dtype)).view_as(x)
    return grad_x, g2.t() @ x2, g2.sum(0) if has_bias else None


def _saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the input is kept in: the compute dtype, but bf16 for fp16 (an fp32 residual above
    65,504 would turn to inf in fp16 and make every gradient NaN while the loss stays finite)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def _layer_norm_with_stats(x: torch.Tensor, norm: tuple, in_dtype: torch.dtype, dtype: torch.dtype) -> tuple:
    """The LayerNorm's output (in the matmul ``dtype``) from ``x`` (the input, or the kept copy of
    it) widened to at least fp32, as autocast runs it and so that the input's gradient comes back
    in full precision; and what :func:`_norm_grads` needs."""
    weight, bias, eps = norm
    wide = torch.promote_types(in_dtype, torch.float32)
    x, w, b = x.to(wide), weight.to(wide), bias.to(wide)
    out, mean, rstd = torch.native_layer_norm(x, weight.shape, w, b, eps)
    return out.to(dtype), (x, w, b, mean, rstd)


def _norm_grads(grad_y: torch.Tensor, state: tuple, weight: torch.Tensor) -> tuple:
    """The LayerNorm's gradients for input, weight and bias, by PyTorch's own backward kernel
    (no graph built in the backward)."""
    x, w, b, mean, rstd = state
    mask = [True, True, True]
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_y.to(x.dtype), x, w.shape, mean, rstd, w, b, mask
    )
    return grad_x, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_w, norm_b, eps, weight, bias, dtype):
        with torch.autocast(x.device.type, enabled=False):
            out = _linear(_layer_norm(x, (norm_w, norm_b, eps), dtype), weight, bias)
        ctx.save_for_backward(x.to(_saved_dtype(dtype)), norm_w, norm_b, weight)
        ctx.eps, ctx.in_dtype, ctx.has_bias = eps, x.dtype, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_w, norm_b, weight = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            y, state = _layer_norm_with_stats(x, (norm_w, norm_b, ctx.eps), ctx.in_dtype, grad.dtype)
            grad_y, grad_w, grad_b = _linear_grads(grad, y, weight, ctx.has_bias)
            grad_x, grad_nw, grad_nb = _norm_grads(grad_y, state, norm_w)
        grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x.to(ctx.in_dtype), grad_nw, grad_nb, None, grad_w.to(weight.dtype), grad_b, None


class _NormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_w, norm_b, eps, w1, b1, w2, b2, dtype):
        with torch.autocast(x.device.type, enabled=False):
            hidden = _linear(_layer_norm(x, (norm_w, norm_b, eps), dtype), w1, b1)
            out = _linear(F.gelu(hidden), w2, b2)
        ctx.save_for_backward(x.to(_saved_dtype(dtype)), norm_w, norm_b, w1, w2, hidden)
        ctx.eps, ctx.in_dtype, ctx.bias = eps, x.dtype, (b1 is not None, b2 is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_w, norm_b, w1, w2, hidden = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grad_act, grad_w2, grad_b2 = _linear_grads(grad, F.gelu(hidden), w2, ctx.bias[1])
            grad_h = torch.ops.aten.gelu_backward(grad_act, hidden)
            y, state = _layer_norm_with_stats(x, (norm_w, norm_b, ctx.eps), ctx.in_dtype, grad.dtype)
            grad_y, grad_w1, grad_b1 = _linear_grads(grad_h, y, w1, ctx.bias[0])
            grad_x, grad_nw, grad_nb = _norm_grads(grad_y, state, norm_w)
        b1 = None if grad_b1 is None else grad_b1.to(w1.dtype)
        b2 = None if grad_b2 is None else grad_b2.to(w2.dtype)
        return grad_x.to(ctx.in_dtype), grad_nw, grad_nb, None, grad_w1.to(w1.dtype), b1, grad_w2.to(w2.dtype), b2, None


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """``linear(norm(x))`` that keeps only ``x`` (in the compute dtype) for the backward."""
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias, compute_dtype(x))


def norm_mlp(x: torch.Tensor, norm: nn.LayerNorm, mlp: nn.Module, scale: nn.Module) -> torch.Tensor:
    """``scale(mlp(norm(x)))`` for timm's ``Mlp`` (fc1, exact GELU, fc2, as the blocks build it)
    and a LayerScale (or Identity), keeping only ``x`` and fc1's output for the backward."""
    dtype = compute_dtype(x)
    w2, b2 = scaled_weights(mlp.fc2, scale, dtype)
    args = (norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias, w2, b2)
    return _NormMlp.apply(x, *args, dtype)

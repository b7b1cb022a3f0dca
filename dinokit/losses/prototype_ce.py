"""Cross-entropy against K prototypes without a (rows, K) tensor alive through the backward.

The DINO and iBOT losses score rows of head embeddings ``z`` (M, D) against prototypes ``W``
(K, D): logits ``z W^T / tau``, then a soft cross-entropy with teacher targets. With DINOv2's
K = 65,536 and ~15k masked patches per ViT-S/8 batch, the logits, their log-softmax and the
targets are each ~3.9 GB in fp32, and autograd would keep them until the backward.

:class:`PrototypeCrossEntropy` works through the rows in chunks. For each chunk it computes the
logits (tensor-core matmul in the autocast dtype, fp32 output, softmax in fp32), the loss, and at
once the gradient of the loss with respect to the logits, which for a soft cross-entropy is
``(rowsum(t) * softmax - t) / tau`` times the row weight. It turns that into the (M, D) and (K, D)
gradients of ``z`` and ``W`` and keeps only those (as a fused linear cross-entropy does). The
reference, with everything materialised, is ``DINOLoss`` / ``IBOTPatchLoss`` on logits; tests
hold the two equal.
"""

from __future__ import annotations

import torch

# Rows per chunk: about 2^27 logits (512 MB in fp32) at a time, whatever K is.
CHUNK_ELEMENTS = 1 << 27


def compute_dtype(device_type: str) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (bf16, or fp16 on pre-Ampere GPUs), else fp32."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def chunk_rows(k: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(k, 1))


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result: half-precision inputs accumulate and stay in fp32 (no rounding
    of the logits to bf16, whose 0.4 % would be 10 % of a logit gap at tau = 0.04). On CUDA one
    tensor-core matmul (torch 2.8+); elsewhere, and on older torch, the same numbers in fp32."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8: no out_dtype
            pass
    return a.float() @ b.float()


def half_scale(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A power of two that lifts ``g``'s largest entry to about 1 before an fp16 cast (exact to undo).

    The logit gradients are formed before any loss scaler sees them, and at K = 65,536 most are
    ~1e-7: below fp16's normal range. bf16 and fp32 have the range; they get 1.
    """
    if dtype != torch.float16:
        return g.new_ones(())
    return torch.exp2(-torch.floor(torch.log2(g.abs().amax().clamp_min(torch.finfo(torch.float32).tiny))))


@torch.no_grad()
def prototype_logits(z: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``z W^T`` in fp32 (the teacher's logits), the matmul in ``dtype`` (default: autocast's)."""
    dtype = dtype or compute_dtype(z.device.type)
    with torch.autocast(z.device.type, enabled=False):
        return fp32_matmul(z.to(dtype), weight.to(dtype).t())


class PrototypeCrossEntropy(torch.autograd.Function):
    """``sum_i row_weight_i * CE(targets_i, softmax(z_i W^T / temp))``, gradients computed in the forward."""

    @staticmethod
    def forward(ctx, z, weight, targets, row_weights, temp: float, dtype: torch.dtype):  # type: ignore[override]
        with torch.autocast(z.device.type, enabled=False):
            zc, wc = z.to(dtype), weight.to(dtype)
            loss = torch.zeros((), device=z.device, dtype=torch.float32)
            grad_z = torch.empty_like(z)
            grad_w = torch.zeros(weight.shape, device=z.device, dtype=torch.float32)
            step = chunk_rows(weight.shape[0])
            for s in range(0, z.shape[0], step):
                e = s + step
                logp = torch.log_softmax(fp32_matmul(zc[s:e], wc.t()).div_(temp), dim=-1)
                t = targets[s:e].float()
                w = row_weights[s:e].float()
                loss += (w * -(t * logp).sum(-1)).sum()
                # d loss / d logits: (rowsum(t) * p - t) * w / temp, in place over logp
                g = logp.exp_().mul_(t.sum(-1, keepdim=True)).sub_(t).mul_((w / temp)[:, None])
                scale = half_scale(g, dtype)
                g = (g * scale).to(dtype)
                grad_z[s:e] = (fp32_matmul(g, wc) / scale).to(z.dtype)
                grad_w += fp32_matmul(g.t(), zc[s:e]) / scale
        ctx.save_for_backward(grad_z, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_z, grad_w = ctx.saved_tensors
        return grad_z * grad_loss, grad_w * grad_loss, None, None, None, None


def prototype_cross_entropy(
    z: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor, temp: float
) -> torch.Tensor:
    """Weighted soft cross-entropy of ``z`` (M, D) against prototypes ``weight`` (K, D); see module doc.

    ``targets`` (M, K) need not sum to one per row: a row summing to c counts as c targets at once
    (the DINO loss sums each student view's cross-entropy over several teacher views).
    """
    if z.shape[0] == 0:
        return (z.sum() + weight.sum()) * 0.0
    return PrototypeCrossEntropy.apply(z, weight, targets, row_weights, temp, compute_dtype(z.device.type))

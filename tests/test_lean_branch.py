"""Memory-lean block branches: the same numbers as the plain modules, and only what the backward
cannot cheaply recompute kept for it (counts derived by hand from the shapes)."""

from __future__ import annotations

import pytest
import torch

from dinokit.models.lean_branch import lean_branches_pay
from dinokit.models.vit import _drop_add_residual_subset, build_vit
from dinokit.train.proxies import saved_bytes

D, HEADS = 48, 2  # vit_pico


def _block(dtype: torch.dtype, layerscale: float = 0.1, drop_path: float = 0.0):
    torch.manual_seed(0)
    return build_vit("vit_pico", 8, 32, layerscale=layerscale, drop_path=drop_path).blocks[0].to(dtype)


def _run(block, x, lean: bool, queries=None, autocast: bool = False) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of a squared-sum loss."""
    block.lean = lean
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(1)  # the same stochastic-depth draw on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x, queries)
    y.float().pow(2).sum().backward()
    return [y.detach().float(), x.grad] + [p.grad for p in block.parameters()]


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((u - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("queries", [None, torch.tensor([[0, 3], [1, 5], [2, 16]])])
@pytest.mark.parametrize("drop_path", [0.0, 0.4])
def test_lean_branches_equal_the_plain_modules_in_fp64(queries, drop_path: float) -> None:
    block = _block(torch.float64, drop_path=drop_path).train()
    x = torch.randn(3, 17, D, dtype=torch.float64)
    lean, plain = _run(block, x, True, queries), _run(block, x, False, queries)
    assert _max_rel(lean, plain) < 1e-12


def test_without_layerscale_the_fp32_forward_is_bit_exact() -> None:
    block = _block(torch.float32, layerscale=0.0)
    x = torch.randn(2, 17, D)
    lean, plain = _run(block, x, True), _run(block, x, False)
    assert torch.equal(lean[0], plain[0])
    assert _max_rel(lean[1:], plain[1:]) < 1e-5


def test_under_bf16_autocast_the_gradients_follow_the_plain_path() -> None:
    block = _block(torch.float32)
    x = torch.randn(3, 17, D)
    lean, plain = _run(block, x, True, autocast=True), _run(block, x, False, autocast=True)
    # the kept input is bf16, LayerScale is applied before the rounding: about 2^-8 relative
    assert _max_rel(lean, plain) < 2e-2


def test_a_lean_block_keeps_only_what_its_matmuls_cannot_give_back() -> None:
    """Per token, in bf16: the input twice (one per branch, 2 x 2D bytes), qkv (6D), the attention
    output (2D), fc1's output (8D), and the attention's fp32 log-sum-exp per head (4H); per step,
    the folded LayerScale weights in bf16 (proj D x D, fc2 4D x D)."""
    block = _block(torch.float32)
    b, n = 2, 17
    x = torch.randn(b, n, D)

    def forward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block(x)

    block.lean = True
    lean = saved_bytes(forward)
    expected = b * n * (2 * 2 * D + 6 * D + 2 * D + 8 * D + 4 * HEADS) + 2 * (D * D + 4 * D * D)
    assert lean == expected
    block.lean = False
    assert lean < 0.6 * saved_bytes(forward)  # eager keeps fp32 LN inputs, LN outputs, GELU in and out


def test_stochastic_depth_keeps_only_the_index_of_the_kept_samples() -> None:
    x = torch.randn(4, 5, 6, requires_grad=True)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _drop_add_residual_subset(x, lambda t: t * 3.0, 0.5)
    storages = {t.untyped_storage().data_ptr(): (t.dtype, tuple(t.shape)) for t in kept}
    assert list(storages.values()) == [(torch.int64, (2,))]  # the gather and the update share it
    y.sum().backward()  # kept samples get 1 + 3 x 2 (the rescale b / keep), dropped ones 1
    assert sorted(x.grad[:, 0, 0].tolist()) == [1.0, 1.0, 7.0, 7.0]


def test_lean_is_off_without_autograd_and_with_checkpointing_it_still_matches() -> None:
    torch.manual_seed(0)
    model = build_vit("vit_pico", 8, 32, layerscale=0.1).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert not model.blocks[0]._lean()
        reference = model.forward_features(x)["cls"]
    model.grad_checkpointing = True
    out = model.forward_features(x)["cls"]
    assert torch.allclose(out, reference, rtol=0, atol=1e-12)
    out.sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())


@pytest.mark.parametrize("device_type, lean", [("cuda", True), ("mps", True), ("xpu", True), ("cpu", False)])
def test_lean_branches_where_memory_is_scarce_not_on_the_cpu(device_type: str, lean: bool) -> None:
    assert lean_branches_pay(device_type) is lean


def test_training_set_up_picks_the_lean_branches_by_device() -> None:
    from dinokit.config import make_config
    from dinokit.train.setup import build_parts

    parts = build_parts(make_config("ci"), torch.device("cpu"), "fp32", resume=False, world=1)
    assert not any(block.lean for block in parts.student.backbone.blocks)


def test_fp16_keeps_a_large_residual_finite_and_the_input_gradient_full_precision() -> None:
    """A residual above fp16's 65,504 is kept in bf16 (fp16 would make it inf: NaN gradients
    under a finite loss); the input's gradient comes back in fp32, not rounded to 16 bits."""
    block = _block(torch.float32)
    x = torch.randn(2, 17, D)
    x[0, 0, 0] = 7e4
    for dtype in (torch.float16, torch.bfloat16):
        block.lean = True
        block.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = block(xg)
        y.float().pow(2).mean().backward()
        grads = [xg.grad] + [p.grad for p in block.parameters()]
        assert all(torch.isfinite(g).all() for g in grads), dtype
        assert not torch.equal(xg.grad, xg.grad.to(dtype).float()), dtype


def test_a_second_derivative_is_refused_not_silently_wrong() -> None:
    block = _block(torch.float64)
    block.lean = True
    x = torch.randn(1, 5, D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()

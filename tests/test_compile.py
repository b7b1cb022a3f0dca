"""``train.compile``: compiled blocks compute what eager blocks do, compile each shape once,
and a platform where compiling fails trains eager after one warning."""

import logging

import pytest
import torch

from dinokit.data.masking import mask_selection
from dinokit.models import compile as compile_mod
from dinokit.models.vit import build_vit


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_pico", img_size=32, patch_size=8, drop_path=0.0, layerscale=0.1).train()


def _run(model, x, masks, order) -> tuple[torch.Tensor, dict]:
    out = model.forward_selected(x, masks, order)
    local = model.forward_selected(x[:, :, :16, :16])
    loss = out["cls"].sin().sum() + out["patch"].cos().sum() + local["cls"].square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out["patch"].detach(), grads


def test_compiled_blocks_equal_eager_and_compile_each_shape_once() -> None:
    """Captured by Dynamo with AOT autograd (``aot_eager``: inductor's own code generation is what
    ``test_torch_compile_option_trains`` runs end to end)."""
    from torch._dynamo.utils import counters

    eager, compiled = _backbone(), _backbone()
    torch._dynamo.reset()
    assert compile_mod.compile_blocks(compiled, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32)
    masks = torch.rand(4, 16) < 0.3
    order = mask_selection(masks, width=8, n_rows=40)["mask_order"]
    ref_patch, ref_grads = _run(eager, x, masks, order)
    patch, grads = _run(compiled, x, masks, order)
    assert torch.allclose(patch, ref_patch, atol=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):  # another batch with another mask draw: the same shapes, no recompile
        _run(compiled, torch.randn(4, 3, 32, 32), torch.rand(4, 16) < 0.3, order)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failing_compiler_leaves_eager_blocks_and_one_warning(monkeypatch, caplog) -> None:
    model = _backbone()

    def broken(block, dim):
        raise RuntimeError("no C++ compiler found\ndetails")

    monkeypatch.setattr(compile_mod, "_probe", broken)
    with caplog.at_level(logging.WARNING):
        assert not compile_mod.compile_blocks(model)
    assert all(b._compiled_call_impl is None for b in model.blocks)
    assert [r.getMessage() for r in caplog.records] == [
        "train.compile: torch.compile failed here (no C++ compiler found); training runs eager"
    ]
    model.forward_selected(torch.randn(2, 3, 32, 32))  # runs eager


def test_evaluation_runs_compiled_blocks_eager_and_leaves_training_compiled(env) -> None:
    """Without ``eager_blocks`` two evaluation batch sizes after one training step fill Dynamo's
    recompile limit (8 graphs: 5 from compiling and training, 2 per batch size); the kNN check now
    adds none, and the compiled blocks come back even when evaluation fails."""
    from torch._dynamo.utils import counters

    from dinokit.config import make_config
    from dinokit.data.source import prepare_split
    from dinokit.eval.features import features_of
    from dinokit.train.loop import knn_monitor

    model = _backbone()
    torch._dynamo.reset()
    assert compile_mod.compile_blocks(model, backend="aot_eager")
    x, masks = torch.randn(4, 3, 32, 32), torch.rand(4, 16) < 0.3
    order = mask_selection(masks, width=8, n_rows=40)["mask_order"]
    _run(model, x, masks, order)
    graphs = counters["stats"]["unique_graphs"]
    model.eval()
    with torch.no_grad(), compile_mod.eager_blocks(model):
        assert all(b._compiled_call_impl is None for b in model.blocks)
        for batch in (5, 3, 2):
            features_of(model, torch.randn(batch, 3, 32, 32))
    with pytest.raises(RuntimeError), compile_mod.eager_blocks(model):
        raise RuntimeError("evaluation failed")
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    cfg = make_config("ci")
    assert knn_monitor(model, prepare_split(cfg, progress=False), cfg)["top1"] >= 0
    assert counters["stats"]["unique_graphs"] == graphs  # evaluation compiled nothing
    assert all(b._compiled_call_impl is not None for b in model.blocks)  # training compiled again
    model.train()
    _run(model, x, masks, order)
    assert counters["stats"]["unique_graphs"] == graphs  # and its graphs are still the cached ones

import sys
import types

import pytest
import torch

from dinokit.data.masking import mask_selection
from dinokit.models.attention import BACKENDS, flash_attn_available, get_attention_backend
from dinokit.models.heads import DINOHead
from dinokit.models.pretrained import load_timm_vit_weights
from dinokit.models.vit import build_vit

# SDPA has no memory-efficient kernel on the CPU; flash-attn needs its package and a GPU.
CPU_BACKENDS = [b for b in BACKENDS if b not in ("flash-attn", "sdpa-efficient")]


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return build_vit("vit_pico", patch_size=8, img_size=32, n_registers=2, layerscale=1e-2)


def test_output_contract(vit) -> None:
    out = vit.forward_features(torch.randn(3, 3, 32, 32))
    assert out["cls"].shape == (3, 48) and out["patch"].shape == (3, 16, 48)
    assert out["reg"].shape == (3, 2, 48) and out["prenorm"].shape == (3, 19, 48)
    layers = vit.get_intermediate_layers(torch.randn(2, 3, 32, 32), n=2)
    assert len(layers) == 2 and layers[-1][0].shape == (2, 16, 48) and layers[-1][1].shape == (2, 48)


def test_any_image_size_shares_weights(vit) -> None:
    assert vit.forward_features(torch.randn(2, 3, 16, 24))["patch"].shape == (2, 6, 48)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(torch.randn(1, 3, 30, 30))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_agree_forward_and_backward(vit, backend: str) -> None:
    x = torch.randn(2, 3, 32, 32)
    vit.eval()
    vit.set_attention_backend("naive")
    ref = vit(x)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    vit.zero_grad()
    vit.set_attention_backend(backend)
    assert get_attention_backend(vit) == backend
    out = vit(x)
    out.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(dict(vit.named_parameters())[name].grad, grad, atol=1e-4, rtol=1e-3), name


def test_unknown_or_missing_backend_is_clear(vit) -> None:
    with pytest.raises(ValueError, match="unknown attention backend"):
        vit.set_attention_backend("fast")
    if not flash_attn_available():
        with pytest.raises(ValueError, match="flash-attn"):
            vit.set_attention_backend("flash-attn")


def _stand_in_flash_attn_func(q, k, v, softmax_scale=None):
    """The Dao-AILab signature and (b, s, h, d) layout, computed by SDPA: the package needs CUDA."""
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=softmax_scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("version", ["flash-attn", "flash-attn-3"])
def test_flash_attn_backend_matches_naive_with_a_stand_in_package(monkeypatch, version: str) -> None:
    """Our side of the flash-attn backend: the packed call, the query subset of the training's last
    block, and FlashAttention-3's (out, lse) return, against the explicit softmax."""
    from dinokit.models import attention, kernels

    fa2, fa3 = types.ModuleType("flash_attn"), types.ModuleType("flash_attn_interface")
    fa2.flash_attn_func = _stand_in_flash_attn_func
    fa2.flash_attn_qkvpacked_func = lambda qkv, softmax_scale: _stand_in_flash_attn_func(*qkv.unbind(2), softmax_scale)
    fa3.flash_attn_func = lambda *args, **kwargs: (_stand_in_flash_attn_func(*args, **kwargs), None)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setattr(kernels, "flash_attn_kernel_for", lambda device: version)
    torch.manual_seed(0)
    layer, x = attention.Attention(48, 3), torch.randn(2, 9, 48)
    for queries in (None, torch.tensor([[0, 3, 5], [0, 1, 8]])):
        results = []
        for backend in ("naive", "flash-attn"):
            layer.backend = backend
            layer.zero_grad()
            out = layer(x, queries)
            out.square().sum().backward()
            results.append((out.detach(), layer.qkv.weight.grad.clone()))
        (ref, ref_grad), (out, grad) = results
        assert out.shape == ref.shape == (2, 9 if queries is None else 3, 48)
        assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(grad, ref_grad, atol=1e-5)


def test_attention_weights_via_naive_only_for_that_forward(vit) -> None:
    vit.set_attention_backend("sdpa")
    attn = vit.get_last_self_attention(torch.randn(2, 3, 32, 32))
    assert attn.shape == (2, 2, 19, 19)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 2, 19), atol=1e-5)
    assert get_attention_backend(vit) == "sdpa"


def test_mask_token_replaces_masked_patches(vit) -> None:
    x = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, :4] = True
    tokens = vit.prepare_tokens(x, masks)
    other = vit.prepare_tokens(torch.randn(1, 3, 32, 32), masks)
    r = vit.n_prefix_tokens
    assert torch.allclose(tokens[0, r : r + 4], other[0, r : r + 4])  # content gone, position kept
    assert not torch.allclose(tokens[0, r + 4 :], other[0, r + 4 :])


def test_efficient_drop_path_matches_expectation() -> None:
    torch.manual_seed(0)
    model = build_vit("vit_pico", img_size=16, patch_size=8, drop_path=0.5, efficient_drop_path=True, layerscale=0)
    x = torch.randn(64, 3, 16, 16)
    model.eval()
    full = model.forward_features(x)["prenorm"]
    model.train()
    # Each kept sample's residual is scaled by B/keep: averaged over many draws the output is
    # close to the full (eval) forward; a single draw changes some samples.
    torch.manual_seed(1)
    one = model.forward_features(x)["prenorm"]
    assert not torch.allclose(one, full)
    one.sum().backward()  # gradients flow through the subset path
    assert model.blocks[1].attn.qkv.weight.grad is not None


def test_mask_selection_order_rows_and_padding() -> None:
    masks = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    sel = mask_selection(masks, width=3, n_rows=5)
    # each crop's masked patches first, ascending, then the unmasked ones as padding, to width 3
    assert sel["mask_order"].tolist() == [[1, 3, 0], [0, 1, 2], [0, 1, 2]]
    # the real entries of mask_order.flatten(): crop 0's two, crop 2's one; then padding rows
    assert sel["mask_rows"].tolist() == [0, 1, 6, 0, 0]
    assert sel["mask_weights"].tolist() == [0.5, 0.5, 1.0, 0.0, 0.0]
    tight = mask_selection(masks)  # default: this batch's own sizes
    assert tight["mask_order"].shape == (3, 2) and tight["mask_rows"].tolist() == [0, 1, 4]
    with pytest.raises(ValueError, match="static bound"):
        mask_selection(masks, width=1, n_rows=5)


@pytest.mark.parametrize(
    "drop_path, efficient, checkpointing, backend",
    [
        (0.0, True, False, "sdpa"),
        (0.5, True, False, "sdpa"),
        (0.5, False, False, "sdpa"),
        (0.5, True, True, "sdpa"),
        (0.0, True, False, "naive"),
        (0.0, True, False, "sdpa-math"),
    ],
)
def test_forward_selected_equals_full_forward(
    drop_path: float, efficient: bool, checkpointing: bool, backend: str
) -> None:
    """The training forward computes the last block only for CLS and the selected patches: the same
    values and gradients as the full forward, with and without stochastic depth (same draws)."""
    torch.manual_seed(0)
    kwargs = {"drop_path": drop_path, "efficient_drop_path": efficient, "layerscale": 1e-1, "n_registers": 1}
    model = build_vit(
        "vit_pico", img_size=32, patch_size=8, grad_checkpointing=checkpointing, attention=backend, **kwargs
    ).train()
    x = torch.randn(6, 3, 32, 32)
    masks = torch.rand(6, 16) < 0.3
    masks[1] = False  # an image without masked patches
    results = []
    sel = mask_selection(masks, width=10, n_rows=40)  # padded, as the collate's fixed shapes
    for selected in (False, True):
        torch.manual_seed(1)
        if selected:
            out = model.forward_selected(x, masks, sel["mask_order"])
            cls, patch = out["cls"], out["patch"].flatten(0, 1)[sel["mask_rows"][: int(masks.sum())]]
        else:
            out = model.forward_features(x, masks)
            cls, patch = out["cls"], out["patch"][masks]
        (cls.sin().sum() + patch.cos().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        results.append((cls.detach(), patch.detach(), grads))
    (cls_full, patch_full, grads_full), (cls_sel, patch_sel, grads_sel) = results
    assert patch_sel.shape == (int(masks.sum()), 48)
    assert torch.allclose(cls_sel, cls_full, atol=1e-5) and torch.allclose(patch_sel, patch_full, atol=1e-5)
    assert grads_sel.keys() == grads_full.keys()
    for name, grad in grads_full.items():
        assert torch.allclose(grads_sel[name], grad, atol=1e-5, rtol=1e-4), name
    # CLS only (local crops, DINO-only runs): one query token in the last block
    torch.manual_seed(1)
    cls_only = model.forward_selected(x, masks)
    assert cls_only["patch"].shape == (6, 0, 48) and torch.allclose(cls_only["cls"], cls_full, atol=1e-5)


def test_student_and_teacher_outputs_are_those_of_the_full_forward() -> None:
    """SSLModel reads the selected forward: its outputs equal heads applied to the full forward's
    CLS and masked patches, for the student (masked input) and the teacher (unmasked input)."""
    from dinokit.config import make_config
    from dinokit.models.ssl import build_ssl_model

    torch.manual_seed(0)
    cfg = make_config("ci", {"model.drop_path": 0.0})
    model = build_ssl_model(cfg.model, 32).eval()
    globals_, locals_ = torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)
    masks = torch.rand(4, 16) < 0.4
    sel = mask_selection(masks, width=12, n_rows=50)
    real = int(masks.sum())
    for mask_input in (True, False):
        out = model(globals_, locals_ if mask_input else None, masks, mask_input, sel["mask_order"], sel["mask_rows"])
        full = model.backbone.forward_features(globals_, masks if mask_input else None)
        assert torch.allclose(out["cls"], full["cls"], atol=1e-5)
        logits = out["dino_global"] @ out["dino_prototypes"].t()
        assert torch.allclose(logits, model.dino_head(full["cls"]), atol=1e-5)
        head = model.ibot_head or model.dino_head
        ibot = out["ibot"][:real] @ out["ibot_prototypes"].t()
        assert out["ibot"].shape[0] == 50 and torch.allclose(ibot, head(full["patch"][masks]), atol=1e-5)
        if mask_input:
            local_cls = model.backbone.forward_features(locals_)["cls"]
            local = out["dino_local"] @ out["dino_prototypes"].t()
            assert torch.allclose(local, model.dino_head(local_cls), atol=1e-5)


def test_dino_head_logits_are_cosines() -> None:
    """Both conventions start as cosines (g = 1); DINOv2 trains g, DINO v1 freezes it."""
    head = DINOHead(48, out_dim=32, hidden_dim=64, bottleneck_dim=16)
    logits = head(torch.randn(5, 48))
    assert logits.shape == (5, 32) and logits.abs().max() <= 1.0 + 1e-5
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.allclose(g, torch.ones_like(g))  # DINOv2: g is a parameter
    logits.sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    v1 = DINOHead(48, out_dim=32, hidden_dim=64, bottleneck_dim=16, freeze_norm=True)
    g1 = v1.last_layer.parametrizations.weight.original0
    assert not g1.requires_grad and torch.allclose(g1, torch.ones_like(g1))  # DINO v1: norm_last_layer


def test_dinov2_weights_load_and_match_timm() -> None:
    """timm's own DINOv2 ViT (random weights: no download here) gives the same features once
    its state dict is loaded into dinokit's ViT at the same patch size; at patch 8 the weights
    are resampled and the model still runs."""
    timm = pytest.importorskip("timm")
    reference = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, depth=2
    ).eval()
    ours = build_vit("vit_small", patch_size=14, img_size=56, depth=2, layerscale=1e-5).eval()
    missing = load_timm_vit_weights(ours, reference.state_dict())
    assert missing == ["mask_token"]
    x = torch.randn(2, 3, 56, 56)
    assert torch.allclose(ours(x), reference(x), atol=1e-4)
    patch8 = build_vit("vit_small", patch_size=8, img_size=64, depth=2, layerscale=1e-5)
    load_timm_vit_weights(patch8, reference.state_dict())
    assert patch8.patch_embed.proj.weight.shape[-1] == 8
    assert patch8(torch.randn(1, 3, 64, 64)).shape == (1, 384)


def test_wrong_architecture_is_reported() -> None:
    small = build_vit("vit_pico", img_size=32)
    other = build_vit("vit_pico", img_size=32, embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match="does not match"):
        load_timm_vit_weights(small, other.state_dict())


def test_missing_weights_give_a_clear_message(monkeypatch) -> None:
    from dinokit.models import pretrained

    monkeypatch.delenv("DINOKIT_DINOV2_WEIGHTS", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr("timm.create_model", no_network)
    with pytest.raises(RuntimeError, match="DINOKIT_DINOV2_WEIGHTS"):
        pretrained.official_dinov2_state_dict("vit_small")

import numpy as np
import torch
from PIL import Image

from dinokit.models.cls_attention import cls_attention, mass_mask
from dinokit.models.vit import build_vit
from dinokit.viz.attention import attention_for_records, head_overlay


def test_mass_mask_by_hand() -> None:
    maps = torch.tensor([[[0.5, 0.2], [0.2, 0.1]]])  # one head, 2x2 patches
    # 60 % of the mass: 0.5 alone is not enough, 0.5 + 0.2 = 0.7 is: two patches kept
    assert mass_mask(maps, 0.6).sum() == 2
    assert mass_mask(maps, 0.4).tolist() == [[[True, False], [False, False]]]
    assert mass_mask(maps, 1.0).all()


def test_cls_attention_excludes_registers_and_sums_to_patch_mass() -> None:
    torch.manual_seed(0)
    vit = build_vit("vit_pico", img_size=32, patch_size=8, n_registers=2)
    images = torch.randn(2, 3, 32, 24)
    maps = cls_attention(vit, images)
    assert maps.shape == (2, 2, 4, 3)
    assert (maps.sum((-2, -1)) < 1).all()  # the rest went to CLS and the registers
    assert vit.blocks[-1].attn.backend == "sdpa"  # naive only for that forward


def test_overlay_and_odd_sizes() -> None:
    torch.manual_seed(0)
    vit = build_vit("vit_pico", img_size=32, patch_size=8)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 37, 3), dtype=np.uint8))
    batch, maps = attention_for_records(vit, [img], size=35)  # 35 -> 32, a patch multiple
    assert batch.shape[-1] == 32 and maps.shape == (1, 2, 4, 4)
    base = np.full((32, 32, 3), 0.5)
    out = head_overlay(base, maps[0])
    assert out.shape == base.shape and not np.allclose(out, base)

"""The Jaccard index of attention masks against silhouettes: the formula, the image geometry and the
whole pipeline, each against values worked out by hand."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit.eval.jaccard as jac
from dinokit.data.crops import denormalize, fit_to_patches
from dinokit.data.har import Record
from dinokit.models.vit import build_vit


def test_jaccard_by_hand() -> None:
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    f = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # 4 pixels
    f[0, :2, 1:4] = True  # 6 pixels, 2 of them shared with a
    assert jac.jaccard(a, f).item() == pytest.approx(2 / 8)
    assert jac.jaccard(f, f).item() == 1.0
    assert jac.jaccard(torch.zeros_like(a), torch.zeros_like(a)).item() == 0.0  # empty union: 0, not NaN


def _figure_image(tmp_path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[Path, Path]:
    """A dark box on grey, and its silhouette (white on black), both ``size`` = (width, height)."""
    image = np.full((size[1], size[0], 3), 160, np.uint8)
    sil = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 20
    sil[y0:y1, x0:x1] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(sil).save(tmp_path / "sil.png")
    return tmp_path / "img.png", tmp_path / "sil.png"


def test_silhouette_follows_the_whole_image(tmp_path: Path) -> None:
    # a figure at the very left edge of a non-square image: a centre crop would cut most of it off
    img, sil = _figure_image(tmp_path, (64, 48), (0, 10, 12, 40))
    x = fit_to_patches(Image.open(img).convert("RGB"), 99, 8)  # 99 -> 96, a patch multiple
    assert x.shape == (3, 96, 96)
    dark = denormalize(x).mean(0) < 0.35
    mask = jac.silhouette_at(sil, 96)
    assert mask.shape == (96, 96)
    # the whole box survives, scaled by 96/64 across and 96/48 down: 18 x 60 pixels
    assert mask.sum().item() == pytest.approx(18 * 60, rel=0.05)
    assert jac.jaccard(dark[None], mask[None]).item() > 0.9  # image and silhouette line up


def test_attention_jaccard_end_to_end_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 32 x 32 images, patch 8: a 4 x 4 grid; the figure is exactly the top-left 2 x 2 patches
    img, sil = _figure_image(tmp_path, (32, 32), (0, 0, 16, 16))
    figure = torch.zeros(4, 4, dtype=torch.bool)
    figure[:2, :2] = True
    maps = torch.zeros(3, 4, 4)
    maps[0][figure] = 0.25  # all attention on the figure: 3 of its 4 patches hold 60 %, J = 3 / 4
    maps[1, 3, 2] = maps[1, 3, 3] = 0.5  # two background patches: J = 0
    maps[2][figure] = 0.125  # half on the figure, half spread over the 12 background patches:
    maps[2][~figure] = 0.5 / 12  # 60 % takes the 4 figure patches + 3 background ones, J = 4 / 7
    # head average: those two background patches (0.181 each) then 2 of the 4 figure patches
    # (0.125 each) reach 60 % (the third would start at 0.611): J = 2 / (2 + 4)
    monkeypatch.setattr(jac, "cls_attention", lambda backbone, images: maps.expand(len(images), -1, -1, -1))
    records = [Record(name=f"val/{i}.png", label=0, path=str(img)) for i in range(3)]
    vit = build_vit("vit_pico", img_size=32, patch_size=8)
    out = jac.attention_jaccard(vit, records, [sil] * 3, size=32, batch_size=2)
    assert out["heads"] == pytest.approx([75.0, 0.0, 100 * 4 / 7], abs=1e-4)
    assert out["best"] == pytest.approx(75.0) and out["best_head"] == 0
    assert out["head_mean"] == pytest.approx(100 / 3, abs=1e-4)


def test_a_dataset_without_silhouettes_gets_no_score(tmp_path: Path) -> None:
    records = [Record(name="train/a.jpg", label=0, path=str(tmp_path / "a.jpg"))]
    assert jac.silhouettes_of(tmp_path, records) is None


def _patch_features(n_images: int = 4, grid: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with a figure (the centre 2 x 3 patches) on a background that differs per image,
    more than figure and ground differ within one: (B, grid * grid, 8) and the figure (grid, grid)."""
    g = torch.Generator().manual_seed(seed)
    figure = torch.zeros(grid, grid, dtype=torch.bool)
    figure[2:4, 2:5] = True
    direction = torch.zeros(8)
    direction[0] = 1.0
    feats = []
    for i in range(n_images):
        background = torch.zeros(8)
        background[1] = 6.0 * (i - (n_images - 1) / 2)  # between images: far apart
        x = background + 0.1 * torch.randn(grid * grid, 8, generator=g)
        x[figure.reshape(-1)] += 2.0 * direction  # within an image: figure vs ground
        feats.append(x)
    return torch.stack(feats), figure


def test_patch_pca_finds_the_figure_in_every_image() -> None:
    from dinokit.models.patch_pca import patch_pca

    feats, figure = _patch_features()
    out = patch_pca(feats, (6, 6))
    assert out["foreground"].shape == (4, 6, 6) and out["rgb"].shape == (4, 6, 6, 3)
    for i in range(4):  # the figure, not its complement: the side that touches the border less
        assert torch.equal(out["foreground"][i], figure), i
    assert (out["rgb"][~out["foreground"]] == 0).all() and out["rgb"].max() == pytest.approx(1.0)
    # without removing each image's mean, the first component separates the images instead
    plain = patch_pca(feats, (6, 6), center_images=False)["foreground"]
    assert not all(torch.equal(plain[i], figure) for i in range(4))


def test_pca_jaccard_scores_the_pca_mask_against_the_silhouette(tmp_path: Path, monkeypatch) -> None:
    """The PCA mask of patch features equal to `_patch_features`: the figure, so J = 1; its
    complement would score 0."""
    img, sil = _figure_image(tmp_path, (48, 48), (16, 16, 40, 32))  # patches (2..3, 2..4) of a 6 x 6 grid
    feats, _ = _patch_features()
    vit = build_vit("vit_pico", img_size=48, patch_size=8)
    monkeypatch.setattr(vit, "forward_features", lambda x: {"patch": feats[: len(x)]})
    records = [Record(name=f"val/{i}.png", label=0, path=str(img)) for i in range(4)]
    assert jac.pca_jaccard(vit, records, [sil] * 4, size=48, group=4) == pytest.approx(100.0)


def test_pca_jaccard_scores_a_last_lone_image_with_the_group_before(tmp_path: Path, monkeypatch) -> None:
    """Groups of 4 over 5 images: 4 + 1 would leave the fifth unscored (one image has no joint fit),
    so it joins the first group; over 6 images the groups are 4 + 2."""
    img, sil = _figure_image(tmp_path, (48, 48), (16, 16, 40, 32))
    feats, _ = _patch_features(n_images=6)
    vit = build_vit("vit_pico", img_size=48, patch_size=8)
    seen: list[int] = []
    monkeypatch.setattr(vit, "forward_features", lambda x: seen.append(len(x)) or {"patch": feats[: len(x)]})
    for n, groups in ((5, [5]), (6, [4, 2])):
        seen.clear()
        records = [Record(name=f"val/{i}.png", label=0, path=str(img)) for i in range(n)]
        assert jac.pca_jaccard(vit, records, [sil] * n, size=48, group=4) == pytest.approx(100.0)
        assert seen == groups


def test_patch_grid_ceiling_is_the_best_mask_of_whole_patches(tmp_path: Path) -> None:
    """Hand-derived on an 8 x 8 image with 4 x 4 patches: the figure fills patch (0, 0) and half of
    patch (0, 1). Patch (0, 0) alone scores 16 / 24; both patches 24 / 32, the best; all four 24 / 64."""
    from PIL import Image

    from dinokit.eval.jaccard import patch_grid_ceiling

    figure = np.zeros((8, 8), dtype=np.uint8)
    figure[:4, :6] = 255
    Image.fromarray(figure).save(tmp_path / "sil.png")
    assert patch_grid_ceiling([tmp_path / "sil.png"], size=8, patch=4) == pytest.approx(75.0)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "empty.png")
    assert patch_grid_ceiling([tmp_path / "sil.png", tmp_path / "empty.png"], size=8, patch=4) == pytest.approx(37.5)

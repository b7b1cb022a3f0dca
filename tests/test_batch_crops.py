"""Multi-crop on the training device: the same distributions as the per-image pipeline, checked
statistically on the CPU; deterministic per seed; bad images still skipped."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import v2

from dinokit.config import MaskConfig, make_config
from dinokit.data.batch_crops import BatchMultiCrop, DecodeToCanvas, canvas_size, choose_augment_on, crop_boxes
from dinokit.data.crops import BLUR_SIGMA, MultiCrop, denormalize
from dinokit.data.har import Record
from dinokit.data.loader import MultiCropCollate, MultiCropDataset
from dinokit.data.synth import CLASSES, draw_person


def _binomial_ok(hits: torch.Tensor, p: float, sigmas: float = 4.5) -> bool:
    n = hits.numel()
    return abs(float(hits.float().mean()) - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-9) / n) + 1e-9


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_crop_boxes_follow_torchvision_random_resized_crop(scale) -> None:
    """Area fraction, aspect ratio and position: the same distributions as RandomResizedCrop.get_params."""
    h, w, n = 200, 300, 4000
    torch.manual_seed(0)
    boxes = crop_boxes(torch.tensor([[h, w]] * n), scale)
    ours = {
        "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (h * w)).numpy(),
        "ratio": ((boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])).numpy(),
        "left": (boxes[:, 0] / w).numpy(),
    }
    assert (
        (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    )
    image = torch.zeros(3, h, w)
    ref = [v2.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3)) for _ in range(n)]  # (top, left, h, w)
    theirs = {
        "area": np.array([bh * bw / (h * w) for _, _, bh, bw in ref]),
        "ratio": np.array([bw / bh for _, _, bh, bw in ref]),
        "left": np.array([left / w for _, left, _, _ in ref]),
    }
    for key in ours:
        assert ks_2samp(ours[key], theirs[key]).pvalue > 1e-3, key


def test_crop_boxes_fall_back_to_a_centre_crop_for_extreme_shapes() -> None:
    torch.manual_seed(0)
    boxes = crop_boxes(torch.tensor([[10, 200]] * 50), (0.9, 1.0))  # 20:1 can't fit ratio <= 4/3 at 90 % area
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.all(heights == 10) and torch.all(widths == round(10 * 4 / 3))
    assert torch.all(boxes[:, 0] == math.floor((200 - widths[0].item()) / 2))


def _canvases(n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    canvas = torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    return canvas, torch.tensor([[size, size - 4]] * n)


def test_every_augmentation_fires_with_its_probability() -> None:
    torch.manual_seed(0)
    aug = BatchMultiCrop(16, 8, n_local=2, blur_p=(1.0, 0.1, 0.5))
    canvas, hw = _canvases(1200)
    out = aug(canvas, hw)
    assert out["global"].shape == (2400, 3, 16, 16) and out["local"].shape == (2400, 3, 8, 8)
    p = aug.last_params
    for view in ("global0", "global1", "local"):
        assert _binomial_ok(p[view]["flip"], 0.5), view
        assert _binomial_ok(p[view]["jitter"]["batch_prob"], 0.8), view
        assert _binomial_ok(p[view]["gray"], 0.2), view
    assert _binomial_ok(p["global0"]["blur"]["batch_prob"], 1.0)
    assert _binomial_ok(p["global1"]["blur"]["batch_prob"], 0.1)
    assert _binomial_ok(p["local"]["blur"]["batch_prob"], 0.5)
    assert _binomial_ok(p["global1"]["solarize"], 0.2) and "solarize" not in p["global0"]
    # colour jitter factors: brightness / contrast in [0.6, 1.4], saturation [0.8, 1.2], hue [-0.1, 0.1]
    jitter = p["global0"]["jitter"]
    for key, (lo, hi) in {"brightness_factor": (0.6, 1.4), "contrast_factor": (0.6, 1.4),
                          "saturation_factor": (0.8, 1.2), "hue_factor": (-0.1, 0.1)}.items():  # fmt: skip
        values = jitter[key]
        assert values.min() >= lo - 1e-6 and values.max() <= hi + 1e-6, key
        assert abs(float(values.mean()) - (lo + hi) / 2) < 0.05 * (hi - lo), key  # uniform
    # blur: the official 9 px kernel, sigma uniform in [0.1, 2.0] at every crop size
    for view in ("global0", "local"):
        lo, hi = BLUR_SIGMA
        sigma = p[view]["blur"]["sigma"]
        assert sigma.min() >= lo - 1e-6 and sigma.max() <= hi + 1e-6
        assert abs(float(sigma.mean()) - (lo + hi) / 2) <= 0.05 * (hi - lo) + 1e-6


def test_pixel_statistics_match_the_per_image_pipeline() -> None:
    """Same images, both pipelines, many draws: value range, mean and spread of the crops agree."""
    rng = np.random.default_rng(0)
    images = [draw_person(CLASSES[i % len(CLASSES)], 64, np.random.default_rng([3, i])) for i in range(48)]
    per_image = MultiCrop(48, 24, 2, (0.35, 1.0), (0.1, 0.4))
    batched = BatchMultiCrop(48, 24, 2, (0.35, 1.0), (0.1, 0.4))
    decode = DecodeToCanvas(64)
    items = [decode(img) for img in images]
    canvas, hw = torch.stack([i["canvas"] for i in items]), torch.stack([i["hw"] for i in items])
    stats = {"loader": {"global": [], "local": []}, "device": {"global": [], "local": []}}
    for draw in range(6):
        torch.manual_seed(draw)
        out = batched(canvas, hw)
        for kind in ("global", "local"):
            stats["device"][kind].append(denormalize(out[kind]))
        for img in images:
            torch.manual_seed(int(rng.integers(1 << 30)))
            views = per_image(img)
            for kind in ("global", "local"):
                stats["loader"][kind].append(denormalize(torch.stack(views[kind])))
    for kind in ("global", "local"):
        dev, ref = torch.cat(stats["device"][kind]), torch.cat(stats["loader"][kind])
        assert dev.min() >= 0 and dev.max() <= 1  # the value range of a normalised image, as the loader's
        mean_d, mean_r = dev.mean((0, 2, 3)), ref.mean((0, 2, 3))
        std_d, std_r = dev.std((0, 2, 3)), ref.std((0, 2, 3))
        assert torch.allclose(mean_d, mean_r, atol=0.02), (kind, mean_d, mean_r)
        assert torch.allclose(std_d, std_r, atol=0.025), (kind, std_d, std_r)


def test_device_crops_are_deterministic_per_seed() -> None:
    aug = BatchMultiCrop(16, 8, 2)
    canvas, hw = _canvases(8)
    torch.manual_seed(5)
    a = aug(canvas, hw)
    torch.manual_seed(5)
    b = aug(canvas, hw)
    torch.manual_seed(6)
    c = aug(canvas, hw)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["global"], c["global"])


def test_decode_to_canvas_scales_down_only_and_keeps_the_true_size() -> None:
    decode = DecodeToCanvas(64)
    big = decode(Image.new("RGB", (200, 100), (255, 0, 0)))
    assert big["canvas"].shape == (3, 64, 64) and big["hw"].tolist() == [32, 64]
    assert big["canvas"][0, :32, :64].float().mean() > 250
    # padded by repeating the edge, so a bilinear crop touching the image's edge is not darkened
    assert torch.equal(big["canvas"][:, 32:, :], big["canvas"][:, 31:32, :].expand(3, 32, 64))
    small = decode(Image.new("RGB", (20, 30)))
    assert small["hw"].tolist() == [30, 20]


def test_bad_images_are_skipped_on_the_device_path_too(tmp_path) -> None:
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    records = [Record("a", 0, str(good)), Record("bad", 1, str(tmp_path / "bad.jpg")), Record("c", 2, str(good))]
    ds = MultiCropDataset(records, DecodeToCanvas(48))
    batch = MultiCropCollate((2, 2), MaskConfig(), seed=0, global_batch=3)([ds[(0, i, i)] for i in range(3)])
    assert batch["size"] == 2 and batch["bad"] == [("bad", "not an image")]
    assert batch["canvas"].shape == (2, 3, 48, 48) and batch["canvas"].dtype == torch.uint8
    crops = BatchMultiCrop(16, 8, 2)(batch["canvas"], batch["hw"])
    assert crops["global"].shape == (4, 3, 16, 16)


def test_augment_on_choice() -> None:
    assert choose_augment_on("auto", "cuda") == "device" and choose_augment_on("loader", "cuda") == "loader"
    with pytest.raises(ValueError, match="data.augment_on"):
        choose_augment_on("gpu", "cpu")


def test_the_canvas_is_sized_from_the_recipe() -> None:
    """out * (4/3) / sqrt(min_scale), rounded up to 8: the local 96 px crop at 5 % decides for DINOv2."""
    assert canvas_size(224, 96, (0.32, 1.0), (0.05, 0.32)) == 576  # 96 * 4/3 / sqrt(0.05) = 572.4
    assert canvas_size(224, 0, (0.32, 1.0), (0.05, 0.32)) == 528  # globals only: 224 * 4/3 / sqrt(0.32) = 528.0
    c = make_config("cpu-demo").crops
    assert canvas_size(c.global_size, c.local_size, c.global_scale, c.local_scale) == 112  # 48 * 4/3 / sqrt(.35)


@pytest.mark.parametrize("source", [(225, 300), (480, 640)])
@pytest.mark.parametrize(("out", "scale"), [(224, (0.32, 1.0)), (96, (0.05, 0.32))])
def test_no_crop_loses_resolution_to_the_canvas(source, out, scale) -> None:
    """The effective resolution (short side, capped at the output) of the canvas path's crops equals
    the per-image path's (boxes cut from the full-resolution image), draw for draw; the old 264 px
    canvas lost resolution on 640 px photos (benchmarks/crop_resolution.py)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from crop_resolution import OLD_CANVAS, crop_sides

    def effective(canvas):
        torch.manual_seed(0)
        return np.minimum(crop_sides(source, scale, 1000, canvas), out)

    full, canvas = effective(None), effective(canvas_size(224, 96, (0.32, 1.0), (0.05, 0.32)))
    assert (canvas >= full - 1).all()  # the short side, within a pixel (the boxes' rounding) of the full image's
    if source[1] > OLD_CANVAS:
        assert (effective(OLD_CANVAS) < full - 1).mean() > 0.4  # the old canvas lost detail on most crops

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.config import MaskConfig
from dinokit.data.crops import MultiCrop, denormalize, eval_transform
from dinokit.data.har import Record
from dinokit.data.loader import EpochSampler, MultiCropDataset, collate_multicrop
from dinokit.data.masking import block_mask, mask_weights, sample_masks


@pytest.mark.parametrize("n_masked", [4, 20, 50, 100])
def test_block_mask_hits_the_requested_count(n_masked: int) -> None:
    rng = np.random.default_rng(0)
    mask = block_mask((14, 14), n_masked, rng)
    assert mask.shape == (14, 14)
    assert n_masked * 0.8 <= mask.sum() <= n_masked


def test_block_mask_is_made_of_blocks() -> None:
    """Masked cells have masked neighbours: rectangles, not salt-and-pepper noise."""
    mask = block_mask((14, 14), 60, np.random.default_rng(1))
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbours[mask]).mean() > 0.95


def test_sample_masks_statistics() -> None:
    rng = np.random.default_rng(0)
    masks = torch.cat([sample_masks((14, 14), 2, rng, 0.5, (0.1, 0.5)) for _ in range(500)])
    masked = masks.any(dim=1)
    assert 0.45 < masked.float().mean() < 0.55  # half of the global crops
    ratios = masks[masked].float().mean(dim=1)
    assert ratios.min() >= 0.07 and ratios.max() <= 0.5
    assert 0.25 < ratios.mean() < 0.32  # uniform in [0.1, 0.5] -> 0.3 (a little under: blocks stop early)


def test_mask_weights_give_each_image_weight_one() -> None:
    masks = torch.zeros(3, 10, dtype=torch.bool)
    masks[0, :2] = True
    masks[2, :5] = True
    w = mask_weights(masks)
    assert w.shape == (7,)
    assert torch.allclose(w[:2], torch.full((2,), 0.5)) and torch.allclose(w[2:], torch.full((5,), 0.2))


def test_multicrop_shapes_and_values() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    views = MultiCrop(32, 16, 3)(img)
    assert len(views["global"]) == 2 and len(views["local"]) == 3
    assert all(v.shape == (3, 32, 32) for v in views["global"])
    assert all(v.shape == (3, 16, 16) for v in views["local"])
    assert denormalize(views["global"][0]).min() >= 0.0 and denormalize(views["global"][0]).max() <= 1.0
    assert eval_transform(32)(img).shape == (3, 32, 32)


def test_dataset_collate_and_bad_images(tmp_path) -> None:
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(good)
    records = [Record("a", 0, str(good)), Record("b", 1, str(tmp_path / "missing.png")), Record("c", 2, str(good))]
    ds = MultiCropDataset(records, MultiCrop(16, 8, 2), (2, 2), MaskConfig(probability=1.0))
    batch = collate_multicrop([ds[i] for i in range(3)])
    assert batch["size"] == 2 and batch["bad"] == [("b", "missing file")]
    assert batch["global"].shape == (4, 3, 16, 16)  # view-major: 2 views x 2 images
    assert batch["local"].shape == (4, 3, 8, 8)
    assert batch["masks"].shape == (4, 4) and batch["masks"].any(dim=1).all()
    # Same (seed, epoch, index) -> the same crops, whatever happened before.
    again = ds[2]
    torch.manual_seed(123)
    assert torch.equal(ds[2]["global"][0], again["global"][0])


def test_epoch_sampler_resume_and_ranks() -> None:
    full = list(EpochSampler(40, 8, 5, seed=3))
    assert sorted(full) == list(range(40))
    s = EpochSampler(40, 8, 5, seed=3)
    s.set_position(0, start_iter=2)
    assert list(s) == full[16:]
    ranks = [EpochSampler(40, 8, 5, seed=3, rank=r, world=2) for r in (0, 1)]
    per_rank = [list(r) for r in ranks]
    rebuilt = [i for b in range(5) for r in per_rank for i in r[4 * b : 4 * b + 4]]
    assert rebuilt == full
    s.set_position(1)
    assert list(s) != full

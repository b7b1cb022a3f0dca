import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.config import MaskConfig
from dinokit.data.crops import MultiCrop, denormalize, eval_transform
from dinokit.data.har import Record
from dinokit.data.loader import EpochSampler, MultiCropCollate, MultiCropDataset
from dinokit.data.masking import MaskPlan, block_mask, mask_weights


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


def test_mask_plan_masks_exactly_half_with_ratios_spread_over_bins() -> None:
    """As dinov2/data/collate.py: int(0.5 * crops) masked, masked crop i's ratio in the i-th of equal bins."""
    plan = MaskPlan.draw(seed=0, iteration=3, n_crops=64, probability=0.5, ratio=(0.1, 0.5))
    masked = np.sort(plan.ratios[plan.ratios > 0])
    assert len(masked) == 32  # exactly half, every batch
    edges = np.linspace(0.1, 0.5, 33)
    assert np.all((masked >= edges[:-1]) & (masked <= edges[1:]))  # one ratio per bin: evenly spread
    other = MaskPlan.draw(seed=0, iteration=4, n_crops=64)
    assert not np.array_equal(plan.ratios > 0, other.ratios > 0)  # which crops: a new draw per step
    masks = plan.masks((14, 14), np.arange(64), seed=0, iteration=3)
    assert int(masks.any(dim=1).sum()) == 32
    got = masks.float().mean(dim=1)[torch.from_numpy(plan.ratios > 0)]
    want = torch.from_numpy(plan.ratios[plan.ratios > 0]).float()
    assert torch.all(got <= want + 1e-6) and torch.all(got >= want - 0.05)  # blocks stop just short
    # a process builds only its own crops' masks, and they equal the single process's
    assert torch.equal(plan.masks((14, 14), np.arange(16, 32), 0, 3), masks[16:32])


def test_every_batch_masks_exactly_half_even_a_tiny_one() -> None:
    """The bug this replaced: independent coin flips left a whole batch unmasked with prob. 0.5^(2B)."""
    for it in range(50):
        plan = MaskPlan.draw(seed=1, iteration=it, n_crops=4)  # batch 2: two global crops each
        assert int((plan.ratios > 0).sum()) == 2


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
    ds = MultiCropDataset(records, MultiCrop(16, 8, 2))
    collate = MultiCropCollate((4, 4), MaskConfig(probability=1.0), seed=0, global_batch=3)
    batch = collate([ds[(0, i, i)] for i in range(3)])
    assert batch["size"] == 2 and batch["bad"] == [("b", "missing file")]
    assert batch["global"].shape == (4, 3, 16, 16)  # view-major: 2 views x 2 images
    assert batch["local"].shape == (4, 3, 8, 8)
    assert batch["masks"].shape == (4, 16) and batch["masks"].any(dim=1).all()
    # Same (seed, epoch, index) -> the same crops, whatever happened before.
    again = ds[2]
    torch.manual_seed(123)
    assert torch.equal(ds[2]["global"][0], again["global"][0])


def test_epoch_sampler_resume_and_ranks() -> None:
    full = list(EpochSampler(40, 8, 5, seed=3))
    assert sorted(i for _, _, i, _ in full) == list(range(40))
    assert [(it, pos) for it, pos, _, _ in full[:9]] == [(0, p) for p in range(8)] + [(1, 0)]
    s = EpochSampler(40, 8, 5, seed=3)
    s.set_position(0, start_iter=2)
    assert list(s) == full[16:]
    ranks = [EpochSampler(40, 8, 5, seed=3, rank=r, world=2) for r in (0, 1)]
    per_rank = [list(r) for r in ranks]
    rebuilt = [k for b in range(5) for r in per_rank for k in r[4 * b : 4 * b + 4]]
    assert rebuilt == full  # same indices at the same (iteration, position): same masks too
    s.set_position(1)
    assert [k[0] for k in s][:1] == [5]  # epoch 1 starts at iteration 5
    assert [k[2] for k in s] != [k[2] for k in full]


def test_one_pass_over_the_run_gives_the_epochs_batches() -> None:
    """The loop's single sampler pass across epochs yields exactly the per-epoch sequences."""
    per_epoch = []
    for epoch in range(3):
        s = EpochSampler(40, 8, 5, seed=3)
        s.set_position(epoch)
        per_epoch += list(s)
    run = EpochSampler(40, 8, 5, seed=3)
    run.set_range(0, 15)
    assert list(run) == per_epoch and len(run) == 120
    run.set_range(7, 15)  # a resume in the middle of epoch 1
    assert list(run) == per_epoch[7 * 8 :]
    assert {k[3] for k in run} == {1, 2}  # the epoch travels with the key


def test_persistent_workers_see_each_epoch(tmp_path) -> None:
    """Workers copy the dataset once; the epoch in each key, not the parent's state, seeds the crops."""
    from torch.utils.data import DataLoader

    from dinokit.train.setup import loader_options

    paths = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(Record(f"{i}", 0, str(path)))
    outs = []
    for workers in (0, 2):
        sampler = EpochSampler(8, 4, 2, seed=1)
        sampler.set_range(0, 6)  # three epochs in one pass
        collate = MultiCropCollate((2, 2), MaskConfig(), seed=1, global_batch=4)
        loader = DataLoader(MultiCropDataset(paths, MultiCrop(16, 8, 1), seed=1), batch_size=4, sampler=sampler,
                            collate_fn=collate, **loader_options(workers, "cpu"))  # fmt: skip
        outs.append([b["global"] for b in loader])
    assert len(outs[0]) == 6
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    assert not torch.equal(outs[0][0], outs[0][2])  # epoch 1: a new permutation, new crops

import hashlib
from pathlib import Path

import numpy as np

from dinokit.data.har import load_dataset
from dinokit.data.synth import CLASSES, draw_person, generate


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_embedded_dataset_is_deterministic_and_in_kaggle_layout(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", per_class=3, size=32, seed=7, progress=False)
    b = generate(tmp_path / "b", per_class=3, size=32, seed=7, progress=False)
    assert _digest(a) == _digest(b)
    data = load_dataset(a)
    assert data.layout == "kaggle"
    assert data.classes == CLASSES and len(CLASSES) >= 10
    assert len(data.labeled) == 3 * len(CLASSES)
    assert len(data.unlabeled) > 0


def test_classes_are_not_separable_by_colour_statistics() -> None:
    """Mean colour per image carries (almost) no class information: a nearest-centroid
    classifier on it is near chance, so a model has to look at shapes."""
    rng = np.random.default_rng(0)
    feats, labels = [], []
    for label, pose in enumerate(CLASSES):
        for i in range(30):
            img = np.asarray(draw_person(pose, 32, np.random.default_rng([3, label, i])), dtype=float)
            feats.append(np.concatenate([img.mean((0, 1)), img.std((0, 1))]))
            labels.append(label)
    feats, labels = np.array(feats), np.array(labels)
    order = rng.permutation(len(labels))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    centroids = np.stack([feats[train][labels[train] == c].mean(0) for c in range(len(CLASSES))])
    pred = np.argmin(((feats[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == labels[test]).mean()
    assert accuracy < 2.5 / len(CLASSES)  # chance is 1 / 12


def _ensure(out: str) -> str:
    from dinokit.data.synth import ensure_embedded

    root = ensure_embedded(out, per_class=2, size=32)
    return hashlib.sha256((root / "Training_set.csv").read_bytes()).hexdigest()


def test_processes_that_generate_together_get_one_complete_copy(tmp_path: Path) -> None:
    """One process per GPU starts at once: neither may delete or read the other's half-written copy."""
    import multiprocessing as mp

    out = tmp_path / "embedded"
    (out / "train").mkdir(parents=True)  # a stale, incomplete copy (no stamp): replaced
    with mp.get_context("spawn").Pool(3) as pool:
        digests = pool.map(_ensure, [str(out)] * 3)
    assert len(set(digests)) == 1
    assert (out / ".synth-params").is_file()
    assert len(list((out / "train").glob("*.jpg"))) == len(CLASSES) * 2
    assert not list(tmp_path.glob(".embedded.*.partial"))  # no private copies left behind

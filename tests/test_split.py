import shutil
from collections import Counter
from pathlib import Path

import pytest

from dinokit.data.har import load_dataset
from dinokit.data.split import make_split
from dinokit.data.synth import generate


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("synth") / "d", per_class=20, size=24, duplicate_fraction=0.05, progress=False
    )


def test_split_is_deterministic_and_seed_dependent(synth_root: Path) -> None:
    data = load_dataset(synth_root)
    a, b = make_split(data, 0.2, seed=0), make_split(data, 0.2, seed=0)
    assert a.sha256 == b.sha256
    assert {r.name for r in a.val} == {r.name for r in b.val}
    assert make_split(data, 0.2, seed=1).sha256 != a.sha256


def test_split_is_stratified(synth_root: Path) -> None:
    data = load_dataset(synth_root)
    split = make_split(data, 0.2, seed=0)
    per_class = Counter(r.label for r in data.labeled)
    val_per_class = Counter(r.label for r in split.val)
    for label, n in per_class.items():
        # ~20% per class; a duplicate group may push one class over by its size
        assert abs(val_per_class[label] - 0.2 * n) <= 2, (label, val_per_class[label], n)
    assert len(split.train) + len(split.val) == len(data.labeled)
    assert not {r.name for r in split.train} & {r.name for r in split.val}


def test_exact_duplicates_stay_on_one_side(synth_root: Path) -> None:
    data = load_dataset(synth_root)
    split = make_split(data, 0.2, seed=0)
    assert split.duplicate_groups >= 10  # 5% of 240 images were copied
    side = {}
    for part, records in (("train", split.train), ("val", split.val)):
        for rec in records:
            digest = split.hashes[rec.name]
            assert side.setdefault(digest, part) == part, f"{rec.name} has a copy on the other side"


def test_split_does_not_depend_on_file_order_or_location(synth_root: Path, tmp_path: Path) -> None:
    data = load_dataset(synth_root)
    copy = tmp_path / "elsewhere"
    shutil.copytree(synth_root, copy)
    lines = (copy / "Training_set.csv").read_text().splitlines()
    (copy / "Training_set.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert make_split(load_dataset(copy), 0.2, 0).sha256 == make_split(data, 0.2, 0).sha256


def test_unlabeled_copies_of_heldout_images_are_dropped(synth_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "leaky"
    shutil.copytree(synth_root, copy)
    data = load_dataset(copy)
    split = make_split(data, 0.2, 0)
    leaked = split.val[0]
    (copy / "test" / "leak.jpg").write_bytes(Path(leaked.path).read_bytes())
    with (copy / "Testing_set.csv").open("a") as f:
        f.write("leak.jpg\n")
    split2 = make_split(load_dataset(copy), 0.2, 0)
    assert split2.dropped_unlabeled == 1
    assert "test/leak.jpg" not in {r.name for r in split2.unlabeled}


def test_manifest_written_and_checksummed(synth_root: Path, tmp_path: Path) -> None:
    import hashlib

    split = make_split(load_dataset(synth_root), 0.2, 0)
    path = tmp_path / "m" / "split.csv"
    sha = split.write_manifest(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    lines = path.read_text().splitlines()
    assert lines[0] == "filename,label,split,sha1"
    assert len(lines) == 1 + len(split.train) + len(split.val) + len(split.unlabeled)
    assert str(synth_root) not in path.read_text()  # relative names only: same sha for every user


def test_bad_fraction_rejected(synth_root: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        make_split(load_dataset(synth_root), 1.5, 0)

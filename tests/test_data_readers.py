from pathlib import Path

import pytest

from dinokit.data.check import check_dataset
from dinokit.data.har import DatasetError, detect_layout, load_dataset
from dinokit.data.images import BadImage, load_rgb


def test_kaggle_layout(kaggle_root: Path) -> None:
    data = load_dataset(kaggle_root)
    assert data.layout == "kaggle"
    assert data.classes[:3] == ["calling", "clapping", "cycling"]  # HAR labels -> HAR's 15 classes
    assert len(data.classes) == 15
    assert len(data.labeled) == 18 and len(data.unlabeled) == 4
    assert {r.label for r in data.labeled} == {0, 1, 2}


def test_kaggle_nested_one_level(tmp_path: Path, kaggle_root: Path) -> None:
    wrapper = kaggle_root.parent
    assert detect_layout(wrapper) == ("kaggle", kaggle_root)


def test_parquet_layout(parquet_root: Path) -> None:
    data = load_dataset(parquet_root)
    assert data.layout == "parquet"
    assert data.classes == ["calling", "clapping", "cycling"]  # from the parquet metadata
    assert len(data.labeled) == 18
    assert len(data.unlabeled) == 5  # the HF test split (all label 0) is unlabelled
    assert all(r.label == -1 for r in data.unlabeled)
    assert load_rgb(data.labeled[0].source).mode == "RGB"


def test_folders_layout(folders_root: Path) -> None:
    data = load_dataset(folders_root)
    assert data.layout == "folders"
    assert data.classes == ["calling", "clapping", "cycling"]
    assert len(data.labeled) == 15 and len(data.unlabeled) == 1


def test_unknown_layout_names_the_expected_ones(tmp_path: Path) -> None:
    (tmp_path / "random.txt").write_text("hello")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    for layout in ("kaggle", "parquet", "folders"):
        assert layout in str(err.value)


def test_missing_root_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_bad_csv_header(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "Training_set.csv").write_text("name,class\na.jpg,x\n")
    with pytest.raises(DatasetError, match="filename,label"):
        load_dataset(tmp_path)


def test_messy_csv_is_read_and_problems_counted(messy_kaggle_root: Path) -> None:
    data = load_dataset(messy_kaggle_root)
    # BOM + whitespace handled: the good rows and the odd-format images are all there.
    names = {r.name for r in data.labeled}
    assert "train/Image_1.jpg" in names and "train/cmyk.jpg" in names
    counts = data.problems.counts
    assert counts["missing file"] == 1
    assert counts["unknown label"] == 1
    assert counts["missing label"] == 1


@pytest.mark.parametrize("name", ["grey.jpg", "rgba.png", "cmyk.jpg", "palette.png", "deep16.png"])
def test_odd_modes_become_rgb(messy_kaggle_root: Path, name: str) -> None:
    img = load_rgb(messy_kaggle_root / "train" / name)
    assert img.mode == "RGB" and img.size == (20, 20)


def test_deep16_is_rescaled_not_clipped(messy_kaggle_root: Path) -> None:
    import numpy as np

    arr = np.asarray(load_rgb(messy_kaggle_root / "train" / "deep16.png"))
    assert arr.min() < 30 and arr.max() > 225 and len(np.unique(arr)) > 50


@pytest.mark.parametrize(
    ("name", "reason"),
    [("truncated.jpg", "truncated"), ("empty.jpg", "empty"), ("notes.jpg", "not an image"),
     ("bomb.png", "too large"), ("missing.jpg", "missing")],
)  # fmt: skip
def test_bad_images_raise_with_reason(messy_kaggle_root: Path, name: str, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        load_rgb(messy_kaggle_root / "train" / name)


def test_check_report_on_messy_data(messy_kaggle_root: Path) -> None:
    report = check_dataset(messy_kaggle_root)
    assert report.usable
    counts = report.problems.counts
    assert counts["truncated"] == 1 and counts["empty file"] == 1 and counts["not an image"] == 1
    assert counts["too large"] == 1 and counts["missing file"] == 1
    assert report.problems.total == 7  # 4 bad images + missing file + unknown label + missing label
    text = report.text()
    assert "kaggle" in text and "usable:    yes" in text and "truncated" in text
    # the five odd-format images survive: 18 good + 5 converted + strange-label/no-label dropped
    assert len(report.data.labeled) == 23


@pytest.mark.parametrize("fixture", ["kaggle_root", "parquet_root", "folders_root"])
def test_check_report_every_layout(request: pytest.FixtureRequest, fixture: str) -> None:
    report = check_dataset(request.getfixturevalue(fixture))
    assert report.usable and report.split is not None
    assert report.problems.total == 0
    assert len(report.split.train) + len(report.split.val) == len(report.data.labeled)


def test_har_attached_to_a_kaggle_notebook_is_found(tmp_path: Path, kaggle_root: Path, monkeypatch) -> None:
    from dinokit import paths

    monkeypatch.delenv("DINOKIT_DATA", raising=False)
    monkeypatch.setattr(paths, "KAGGLE_INPUT", tmp_path / "kaggle" / "input")
    assert paths.har_root() is None  # not on Kaggle: the embedded dataset
    nested = tmp_path / "kaggle" / "input" / "human-action-recognition-har-dataset" / "Human Action Recognition"
    nested.parent.mkdir(parents=True)
    kaggle_root.rename(nested)
    assert paths.har_root() == nested  # Kaggle's own nesting, found without configuration
    monkeypatch.setenv("DINOKIT_DATA", str(tmp_path))
    assert paths.har_root() == tmp_path.resolve()  # DINOKIT_DATA still wins

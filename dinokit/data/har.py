"""Readers for the Human Action Recognition dataset in the three forms people have it.

* ``kaggle``: ``Training_set.csv`` (filename,label) + ``train/``, ``Testing_set.csv`` + ``test/``
* ``parquet``: the Hugging Face mirror (Bingsu/Human_Action_Recognition): image bytes + integer
  ``labels``; class names in the parquet's ``huggingface`` metadata; its test split is unlabelled
* ``folders``: ``train/<class>/*.jpg`` (or ``<class>/*.jpg``), optional flat ``test/``

All three give one :class:`HarData`; the embedded dataset is written in the Kaggle layout so the
demo exercises the same code path as the real data.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dinokit.data.images import ProblemLog

log = logging.getLogger(__name__)

# The 15 HAR classes (Kaggle "Human Action Recognition (HAR) Dataset"), in the HF mirror's order.
HAR_CLASSES = [
    "calling", "clapping", "cycling", "dancing", "drinking", "eating", "fighting", "hugging",
    "laughing", "listening_to_music", "running", "sitting", "sleeping", "texting", "using_laptop",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUTS = {
    "kaggle": "Training_set.csv + train/ (and Testing_set.csv + test/)",
    "parquet": "*.parquet files from the Hugging Face mirror (train-*.parquet, test-*.parquet)",
    "folders": "train/<class>/*.jpg or <class>/*.jpg (and optionally a flat test/)",
    "images": "a flat folder of images without labels (pre-training only: no classification)",
}


class DatasetError(ValueError):
    """The data root cannot be read; the message says what was expected."""


@dataclass(frozen=True)
class Record:
    """One image: where its bytes come from and its class index (-1 when unlabelled)."""

    name: str
    label: int = -1
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    @property
    def source(self) -> str | bytes:
        return self.data if self.data is not None else str(self.path)


@dataclass
class HarData:
    root: Path
    layout: str
    classes: list[str]
    labeled: list[Record]
    unlabeled: list[Record]
    problems: ProblemLog = field(default_factory=ProblemLog)

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for rec in self.labeled:
            counts[self.classes[rec.label]] += 1
        return counts


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """Return ``(layout, base)``; ``base`` may be one level below ``root`` (Kaggle zips nest)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data root {root} does not exist. See data/README.md for how to get HAR.")
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for base in candidates:
        if (base / "Training_set.csv").is_file():
            return "kaggle", base
    if any(root.glob("*.parquet")) or any(root.glob("*/*.parquet")):
        return "parquet", root
    if _class_dirs(root / "train") or _class_dirs(root):
        return "folders", root
    if _images_in(root):
        return "images", root
    expected = "\n".join(f"  - {name}: {desc}" for name, desc in LAYOUTS.items())
    raise DatasetError(f"{root} matches no dataset layout. Expected one of:\n{expected}")


def _choose_classes(base: Path, labels: Iterable[str]) -> list[str]:
    """``classes.txt`` if the root has one, HAR's 15 if the labels are HAR's, else what is seen."""
    listed = base / "classes.txt"
    if listed.is_file():
        return [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    seen = sorted({lab for lab in labels if lab})
    if seen and sum(lab in HAR_CLASSES for lab in seen) >= len(seen) / 2:
        return list(HAR_CLASSES)
    return seen


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # utf-8-sig drops a byte-order mark; keys and values are stripped of stray whitespace.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [(h or "").strip().lower() for h in reader.fieldnames or []]
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    return header, rows


def read_kaggle(base: Path) -> HarData:
    problems = ProblemLog()
    header, rows = _read_csv(base / "Training_set.csv")
    if "filename" not in header or "label" not in header:
        raise DatasetError(
            f"{base / 'Training_set.csv'} must have the columns filename,label; found {','.join(header)}"
        )
    classes = _choose_classes(base, (r["label"] for r in rows))
    index = {name.lower(): i for i, name in enumerate(classes)}
    labeled = []
    for row in rows:
        name, label = row["filename"], row["label"]
        if not name:
            continue
        path = base / "train" / name
        if not label:
            problems.add(f"train/{name}", "missing label")
        elif label.lower() not in index:
            problems.add(f"train/{name}", f"unknown label ({label!r})")
        elif not path.is_file():
            problems.add(f"train/{name}", "missing file")
        else:
            labeled.append(Record(f"train/{name}", index[label.lower()], str(path)))
    unlabeled = []
    test_csv = base / "Testing_set.csv"
    if test_csv.is_file():
        header, rows = _read_csv(test_csv)
        if "filename" not in header:
            raise DatasetError(f"{test_csv} must have a filename column; found {','.join(header)}")
        names = [r["filename"] for r in rows if r["filename"]]
    elif (base / "test").is_dir():
        names = [p.name for p in _images_in(base / "test")]
    else:
        names = []
    for name in names:
        path = base / "test" / name
        if path.is_file():
            unlabeled.append(Record(f"test/{name}", -1, str(path)))
        else:
            problems.add(f"test/{name}", "missing file")
    return HarData(base, "kaggle", classes, labeled, unlabeled, problems)


def _parquet_class_names(schema_metadata: dict | None) -> list[str] | None:
    raw = (schema_metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        return list(features["labels"]["names"])
    except (KeyError, TypeError, ValueError):
        return None


def read_parquet(root: Path) -> HarData:
    import pyarrow.parquet as pq

    files = sorted(set(root.glob("*.parquet")) | set(root.glob("*/*.parquet")))
    classes: list[str] | None = None
    labeled, unlabeled = [], []
    problems = ProblemLog()
    for file in files:
        table = pq.read_table(file)
        classes = classes or _parquet_class_names(table.schema.metadata)
        columns = table.column_names
        image_col = "image" if "image" in columns else next((c for c in columns if "image" in c), None)
        if image_col is None:
            raise DatasetError(f"{file} has no image column; columns are {columns}")
        images = table.column(image_col).to_pylist()
        labels = table.column("labels").to_pylist() if "labels" in columns else [None] * len(images)
        is_test = "test" in file.stem.lower()
        for row, (image, label) in enumerate(zip(images, labels, strict=True)):
            data = image.get("bytes") if isinstance(image, dict) else image
            inner = image.get("path") if isinstance(image, dict) else None
            name = f"{file.stem}/{inner or row}"
            if not data:
                problems.add(name, "empty file")
            elif is_test or label is None:
                # The HF test split carries label 0 for every image: it is unlabelled.
                unlabeled.append(Record(name, -1, None, data))
            else:
                labeled.append(Record(name, int(label), None, data))
    if classes is None:
        top = max((r.label for r in labeled), default=-1)
        classes = list(HAR_CLASSES) if top < len(HAR_CLASSES) else [str(i) for i in range(top + 1)]
    bad = [r for r in labeled if not 0 <= r.label < len(classes)]
    for rec in bad:
        problems.add(rec.name, f"unknown label ({rec.label})")
    labeled = [r for r in labeled if 0 <= r.label < len(classes)]
    return HarData(root, "parquet", classes, labeled, unlabeled, problems)


def read_folders(root: Path) -> HarData:
    base = root / "train" if _class_dirs(root / "train") else root
    class_dirs = [d for d in _class_dirs(base) if d.name != "test"]
    classes = [d.name for d in class_dirs]
    labeled = [Record(str(p.relative_to(root)), i, str(p)) for i, d in enumerate(class_dirs) for p in _images_in(d)]
    test = root / "test"
    unlabeled = [Record(str(p.relative_to(root)), -1, str(p)) for p in _images_in(test)] if test.is_dir() else []
    return HarData(root, "folders", classes, labeled, unlabeled)


def read_images(root: Path) -> HarData:
    """Images without labels: pre-training can use them; classification and predictions cannot."""
    return HarData(root, "images", [], [], [Record(p.name, -1, str(p)) for p in _images_in(root)])


def load_dataset(root: str | Path) -> HarData:
    """Detect the layout of ``root`` and read it into records (images are not decoded here)."""
    layout, base = detect_layout(root)
    reader = {"kaggle": read_kaggle, "parquet": read_parquet, "folders": read_folders, "images": read_images}[layout]
    data = reader(base)
    if not data.labeled and (layout != "images" or not data.unlabeled):
        raise DatasetError(f"{root} ({layout} layout) has no labelled images; {data.problems.summary()}")
    if not data.labeled:
        log.warning("%s has no labels: pre-training uses its %d images; kNN, the linear probe and predictions are "
                    "skipped", root, len(data.unlabeled))  # fmt: skip
    return data

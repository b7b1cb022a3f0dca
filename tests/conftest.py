"""Fixtures: tiny datasets in each HAR layout, written by the tests themselves (no downloads)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Keep tests small and quiet on a 2-core box.
os.environ.setdefault("DINOKIT_PROFILE", "ci")

CLASSES = ["calling", "clapping", "cycling"]  # a subset of HAR's labels


def jpeg_bytes(seed: int, size: int = 24, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    return buf.getvalue()


def write_kaggle(root: Path, per_class: int = 6, n_test: int = 4) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            fname = f"Image_{c * per_class + i + 1}.jpg"
            (root / "train" / fname).write_bytes(jpeg_bytes(100 * c + i))
            rows.append((fname, name))
    (root / "Training_set.csv").write_text("filename,label\n" + "".join(f"{f},{lab}\n" for f, lab in rows))
    names = []
    for i in range(n_test):
        (root / "test" / f"Image_{i + 1}.jpg").write_bytes(jpeg_bytes(10_000 + i))
        names.append(f"Image_{i + 1}.jpg")
    (root / "Testing_set.csv").write_text("filename\n" + "".join(f"{n}\n" for n in names))
    return root


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data, runs and report place for a test that trains (no DINOKIT_DATA: embedded data)."""
    monkeypatch.setenv("DINOKIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DINOKIT_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("DINOKIT_DATA", raising=False)
    return tmp_path


@pytest.fixture
def kaggle_root(tmp_path: Path) -> Path:
    return write_kaggle(tmp_path / "har")


@pytest.fixture
def messy_kaggle_root(tmp_path: Path) -> Path:
    """Kaggle layout with every kind of bad input the readers must survive."""
    root = write_kaggle(tmp_path / "messy")
    train = root / "train"
    rng = np.random.default_rng(0)
    good = jpeg_bytes(1)
    (train / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (train / "empty.jpg").write_bytes(b"")
    (train / "notes.jpg").write_text("this is not an image")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(train / "grey.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(train / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(train / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P").save(train / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(train / "deep16.png")
    # A decompression bomb: tiny on disk, huge in memory.
    Image.new("1", (9000, 9000)).save(train / "bomb.png")
    extra = [
        ("truncated.jpg", "calling"), ("empty.jpg", "clapping"), ("notes.jpg", "cycling"),
        ("grey.jpg", "calling"), ("rgba.png", "clapping"), ("cmyk.jpg", "cycling"),
        ("palette.png", "calling"), ("deep16.png", "clapping"), ("bomb.png", "cycling"),
        ("missing.jpg", "calling"), ("strange.jpg", "juggling"), ("nolabel.jpg", ""),
    ]  # fmt: skip
    (train / "strange.jpg").write_bytes(good)
    (train / "nolabel.jpg").write_bytes(good)
    text = (root / "Training_set.csv").read_text()
    header, body = text.split("\n", 1)
    # BOM, spaces around the header and values, Windows line endings.
    lines = [" filename , label "] + body.splitlines() + [f" {f} , {lab} " for f, lab in extra]
    (root / "Training_set.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    return root


@pytest.fixture
def parquet_root(tmp_path: Path) -> Path:
    """The Hugging Face mirror's shape: image structs + int labels + class names in metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "hf" / "data"
    root.mkdir(parents=True)
    meta = {"info": {"features": {"image": {"_type": "Image"}, "labels": {"names": CLASSES, "_type": "ClassLabel"}}}}

    def write(name: str, n: int, labelled: bool, seed: int) -> None:
        images = [{"bytes": jpeg_bytes(seed + i), "path": f"img_{i}.jpg"} for i in range(n)]
        labels = [i % len(CLASSES) for i in range(n)] if labelled else [0] * n
        table = pa.table({"image": images, "labels": labels})
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
        pq.write_table(table, root / name)

    write("train-00000-of-00001.parquet", 18, True, 0)
    write("test-00000-of-00001.parquet", 5, False, 500)
    return root.parent


@pytest.fixture
def folders_root(tmp_path: Path) -> Path:
    root = tmp_path / "folders"
    for c, name in enumerate(CLASSES):
        (root / "train" / name).mkdir(parents=True)
        for i in range(5):
            (root / "train" / name / f"{i}.jpg").write_bytes(jpeg_bytes(50 * c + i))
    (root / "test").mkdir()
    (root / "test" / "u0.jpg").write_bytes(jpeg_bytes(999))
    return root

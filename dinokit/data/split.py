"""The fixed train / held-out split and its manifest.

HAR's 5,400 test images have no labels, so the held-out set is carved out of the 12,600
labelled ones: stratified by class, seeded, and with exact duplicates (same bytes) always on the
same side, since HAR has such duplicates. Unlabelled images that duplicate a held-out image are
dropped from pre-training so the held-out set never leaks into it. The manifest is a CSV of
relative names, so its sha256 is the same for every user with the same data.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dinokit.data.har import HarData, Record


def content_hash(record: Record) -> str:
    data = record.data if record.data is not None else Path(record.path or "").read_bytes()
    return hashlib.sha1(data).hexdigest()


@dataclass
class Split:
    classes: list[str]
    train: list[Record]
    val: list[Record]
    unlabeled: list[Record]
    hashes: dict[str, str]  # record name -> sha1 of its bytes
    seed: int
    val_fraction: float
    duplicate_groups: int  # groups of 2+ identical labelled images
    dropped_unlabeled: int  # unlabelled copies of held-out images, kept out of pre-training

    def manifest_text(self) -> str:
        lines = ["filename,label,split,sha1"]
        for part, records in (("train", self.train), ("val", self.val), ("unlabeled", self.unlabeled)):
            for rec in sorted(records, key=lambda r: r.name):
                label = self.classes[rec.label] if rec.label >= 0 else ""
                lines.append(f"{rec.name},{label},{part},{self.hashes[rec.name]}")
        return "\n".join(lines) + "\n"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.manifest_text().encode()).hexdigest()

    def write_manifest(self, path: str | Path) -> str:
        """Write the manifest atomically and return its sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.manifest_text())
        tmp.replace(path)
        return self.sha256

    def summary(self) -> str:
        return (
            f"train {len(self.train)}, val {len(self.val)} (held out), unlabeled {len(self.unlabeled)}; "
            f"{self.duplicate_groups} duplicate group(s) kept on one side; sha256 {self.sha256[:16]}…"
        )


def make_split(data: HarData, val_fraction: float = 0.2, seed: int = 0, progress: bool = True) -> Split:
    """Stratified, seeded, duplicate-aware split of ``data.labeled`` into train / val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    records = data.labeled + data.unlabeled
    hashes = {
        rec.name: content_hash(rec)
        for rec in tqdm(records, desc="hashing images", disable=not progress or len(records) < 2000)
    }
    groups: dict[str, list[Record]] = defaultdict(list)
    for rec in data.labeled:
        groups[hashes[rec.name]].append(rec)
    # A group goes with its most common label (ties: lowest index), so a duplicate pair with
    # two different labels still lands on one side.
    by_class: dict[int, list[str]] = defaultdict(list)
    for digest, members in groups.items():
        label = min(Counter(r.label for r in members).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
        by_class[label].append(digest)
    val_hashes: set[str] = set()
    for label in sorted(by_class):
        digests = sorted(by_class[label])  # hash order: independent of file names and disk order
        rng = np.random.default_rng([seed, label])
        target = round(val_fraction * sum(len(groups[d]) for d in digests))
        taken = 0
        for i in rng.permutation(len(digests)):
            if taken >= target:
                break
            val_hashes.add(digests[i])
            taken += len(groups[digests[i]])
    train = [r for r in data.labeled if hashes[r.name] not in val_hashes]
    val = [r for r in data.labeled if hashes[r.name] in val_hashes]
    unlabeled = [r for r in data.unlabeled if hashes[r.name] not in val_hashes]
    return Split(
        classes=list(data.classes),
        train=train,
        val=val,
        unlabeled=unlabeled,
        hashes=hashes,
        seed=seed,
        val_fraction=val_fraction,
        duplicate_groups=sum(len(m) > 1 for m in groups.values()),
        dropped_unlabeled=len(data.unlabeled) - len(unlabeled),
    )


def read_manifest_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

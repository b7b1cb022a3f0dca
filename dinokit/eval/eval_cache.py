"""The decoded eval set on disk, so a split is decoded and resized once, not at every kNN check.

The kNN monitor extracts features of the same train and val records every few epochs; only the
backbone changes, never the pixels. One file per (records, size) under ``paths.cache_dir()/eval``
holds the uint8 images, which records they are, and the images that could not be read (so those
are still skipped and counted from the cache). The key hashes each record's name and source with
the file's size and mtime (in-memory records: their bytes), so a changed or replaced file gives a
new key and a stale file is never read back. Files are written atomically and read weights-only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dinokit import paths
from dinokit.data.har import Record
from dinokit.runs import save_atomic

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the stored pixels would change (eval_images.uint8_transform, load_rgb)


@dataclass
class DecodedSet:
    images: torch.Tensor  # (N, C, H, W) uint8, the readable records only
    indices: torch.Tensor  # (N,) position of each image in the records
    bad: list[tuple[str, str]]  # (name, reason) of each record that could not be read


def _fingerprint(rec: Record) -> str:
    if rec.data is not None:
        return "bytes " + hashlib.blake2b(rec.data, digest_size=16).hexdigest()
    try:
        stat = os.stat(rec.path)
    except OSError:
        return f"{rec.path} missing"
    return f"{rec.path} {stat.st_size} {stat.st_mtime_ns}"


def cache_key(records: Sequence[Record], size: int) -> str:
    """Changes with the records' order, names, files (path, size, mtime) or bytes, and with ``size``."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size}px\n".encode())
    for rec in records:
        digest.update(f"{rec.name}\0{_fingerprint(rec)}\n".encode())
    return digest.hexdigest()[:24]


def cache_path(records: Sequence[Record], size: int) -> Path:
    return paths.cache_dir() / "eval" / f"{size}px-{len(records)}-{cache_key(records, size)}.pt"


def load_decoded(path: Path) -> DecodedSet | None:
    """The cached set, memory-mapped; ``None`` when there is none or it cannot be read (decode again)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True, mmap=True)
        return DecodedSet(data["images"], data["indices"], [(name, reason) for name, reason in data["bad"]])
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        log.warning("ignoring unreadable eval cache %s (%s); decoding again", path, str(exc).splitlines()[0][:120])
        return None


def save_decoded(decoded: DecodedSet, path: Path) -> None:
    """Write atomically; a cache that cannot be written (disk full, read-only) costs a warning, not the features."""
    try:
        save_atomic({"images": decoded.images, "indices": decoded.indices, "bad": decoded.bad}, path)
    except OSError as exc:
        log.warning("could not write the eval cache %s (%s); the next call decodes again", path, exc)

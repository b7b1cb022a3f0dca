"""Where a run's images come from: the data root, its fixed split, and a short name for it.

``data.root`` wins, else ``DINOKIT_DATA`` (real HAR in any supported layout), else the embedded
dataset, generated on first use. The short name (``har``, ``embedded``, or the folder's name) goes
into default run folder names, so runs on different data never share a folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from dinokit import paths
from dinokit.config import Config
from dinokit.data.har import load_dataset
from dinokit.data.split import Split, make_split
from dinokit.data.synth import ensure_embedded

EMBEDDED = "embedded"
# Folder names that say nothing about the data: look one level up (HF cache: .../snapshots/<sha>/data).
_GENERIC = {"data", "train", "dataset", "datasets", "snapshots", "images", "input"}


def configured_root(cfg: Config) -> Path | None:
    """The data root named by the config or the environment; None means the embedded dataset."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser().resolve()
    return paths.har_root()


def resolve_data_root(cfg: Config) -> Path:
    """``data.root``, else ``DINOKIT_DATA``, else the embedded dataset (generated on first use)."""
    root = configured_root(cfg)
    if root is not None:
        return root
    n, size = cfg.data.synth_per_class, cfg.data.synth_size
    return ensure_embedded(paths.embedded_dataset_dir(n, size), n, size)


def dataset_tag(root: Path | None) -> str:
    """``embedded`` for the kit's own data, ``har`` for Human Action Recognition, else the folder name."""
    if root is None or root.name.startswith("embedded-har-"):
        return EMBEDDED
    folder = root
    while folder.parent != folder and (folder.name.lower() in _GENERIC or re.fullmatch(r"[0-9a-f]{40}", folder.name)):
        folder = folder.parent
    slug = re.sub(r"[^a-z0-9]+", "-", folder.name.lower()).strip("-") or "data"
    if slug == "har" or "human-action-recognition" in slug:
        return "har"
    return slug


def data_tag(cfg: Config) -> str:
    """The dataset's short name for ``cfg`` without generating or reading anything."""
    return dataset_tag(configured_root(cfg))


def prepare_split(cfg: Config, progress: bool = True) -> Split:
    """Read the data in use and make its fixed split (problems are summarised once)."""
    data = load_dataset(resolve_data_root(cfg))
    data.problems.warn_once(f"reading {data.root}")
    return make_split(data, cfg.data.val_fraction, cfg.data.split_seed, progress=progress)

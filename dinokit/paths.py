"""Where things live. Every root can be overridden from the environment so that notebooks,
tests and CI never hard-code relative paths like ``../data``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def repo_root() -> Path:
    return _env_path("DINOKIT_ROOT", REPO_ROOT)


def checkout_commit() -> str:
    """The short hash of the checkout this code runs from ("unknown" outside git), to stamp measurements."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root(), capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def home() -> Path:
    """``DINOKIT_HOME``: one folder for runs, reports and caches, which must outlive a session
    (``/kaggle/working``, a mounted Google Drive folder); default: the project itself."""
    return _env_path("DINOKIT_HOME", repo_root())


def data_dir() -> Path:
    """Folder for generated data (the embedded dataset, caches); gitignored."""
    return _env_path("DINOKIT_DATA_DIR", home() / "data")


def cache_dir() -> Path:
    """``DINOKIT_CACHE``, else ``data/cache``: things that are only ever re-computable (decoded eval
    images), under the data folder so that a private ``DINOKIT_DATA_DIR`` gets a private cache too."""
    return _env_path("DINOKIT_CACHE", data_dir() / "cache")


def embedded_dataset_dir(per_class: int, size: int) -> Path:
    """One folder per size of the embedded dataset, so the ``ci`` and demo profiles coexist."""
    return data_dir() / f"embedded-har-{per_class}x{size}px"


KAGGLE_INPUT = Path("/kaggle/input")  # where a Kaggle notebook mounts its attached datasets


def har_root() -> Path | None:
    """``DINOKIT_DATA`` (real HAR in any supported layout), else HAR attached to a Kaggle notebook
    (found under ``/kaggle/input``), else ``None``: use the embedded set."""
    value = os.environ.get("DINOKIT_DATA")
    if value:
        return Path(value).expanduser().resolve()
    return kaggle_har()


def kaggle_har() -> Path | None:
    """The first dataset under ``/kaggle/input`` (two levels deep) that holds HAR's ``Training_set.csv``."""
    if not KAGGLE_INPUT.is_dir():
        return None
    for csv in sorted(KAGGLE_INPUT.glob("*/Training_set.csv")) + sorted(KAGGLE_INPUT.glob("*/*/Training_set.csv")):
        return csv.parent
    return None


def runs_dir() -> Path:
    return _env_path("DINOKIT_RUNS", home() / "runs")


def report_dir() -> Path:
    return _env_path("DINOKIT_REPORT", home() / "report")


def profile() -> str:
    """The notebook profile: ``ci`` (seconds), ``cpu-demo`` (minutes) or a GPU preset."""
    return os.environ.get("DINOKIT_PROFILE", "cpu-demo")

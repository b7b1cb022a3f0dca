"""The run folder: what a run writes, and how everything else reads it back.

Training writes a run folder; evaluation, attention maps, the report, the video and the
notebooks read it. This module is the contract between them and sits below all of them:

    RUN_DIR/config.json        resolved config (re-create or resume the run from it)
            run_info.json      split sha256, data root, device, precision, attention kernel, ...
            split.csv          the split manifest
            metrics.jsonl      one JSON line per logged step, plus kNN records
            train.log          the run's log
            checkpoint.pt      student, teacher, optimizer, scaler, centre, RNG, iteration
            teacher_backbone.pt, snapshots/teacher_<iter>.pt
            eval/, attention/  written by ``dinokit eval`` and ``dinokit attention``

Checkpoints are written atomically and loaded with ``weights_only=True``: a corrupt, foreign or
code-carrying file gives a :class:`CheckpointError` that names the file and what to do, and no
code in it ever runs.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from dinokit import paths
from dinokit.config import Config, make_config
from dinokit.data.source import data_tag

CONFIG, RUN_INFO, SPLIT, METRICS, LOG = "config.json", "run_info.json", "split.csv", "metrics.jsonl", "train.log"
CHECKPOINT, TEACHER, SNAPSHOTS = "checkpoint.pt", "teacher_backbone.pt", "snapshots"
CROPS_EXAMPLE = "crops_example.pt"  # one image's multi-crop views, for the report


class RunError(ValueError):
    """A run folder cannot be used as asked; the message says what to do."""


class DiskFullError(RunError):
    """The disk filled up while a file was written; the previous version of that file is intact."""


class CheckpointError(RunError):
    """A checkpoint file cannot be loaded (corrupt, truncated, foreign, or carrying code)."""


class DataMismatchError(RunError):
    """The data in use is not the data the run was trained on (different split checksum)."""


def default_run_dir(cfg: Config) -> Path:
    """``runs/<preset>-<dataset>``: the preset and the data both name the folder (``runs/har-vits8-har``)."""
    return paths.runs_dir() / f"{cfg.preset}-{data_tag(cfg)}"


def profile_run_dir() -> Path:
    """The default run of ``DINOKIT_PROFILE`` (``cpu-demo``) on the data in use: what the notebooks,
    ``make report`` and ``make video`` open when no run is named."""
    return default_run_dir(make_config(paths.profile()))


def save_atomic(obj: object, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        if _disk_full(exc, path.parent):
            raise DiskFullError(
                f"the disk is full: {path} could not be written"
                + (f" (the previous {path.name} is intact)" if path.exists() else "")
                + f". Free some space under {path.parent} (old runs, data/cache), or point DINOKIT_RUNS or --out "
                "at a larger disk, then run the same command again with --resume."
            ) from exc
        raise
    os.replace(tmp, path)


def _disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:  # a failed write reported without its errno: say "full" only if the disk really is nearly full
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load tensors, numbers and containers only (``weights_only``); never runs code from the file.

    ``mmap=True`` maps tensors lazily: cheap when only a few fields (e.g. the iteration) are read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first with `dinokit pretrain`")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            why = "it carries pickled code or Python objects, which dinokit refuses to run (weights-only loading)"
        else:
            why = "it is not a PyTorch checkpoint written by dinokit"
        raise CheckpointError(_checkpoint_message(path, why)) from None
    except Exception as exc:  # the unpickler fails in many ways on a damaged file (EOF, zip, index errors)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        why = f"it is truncated or corrupt ({first})"
        raise CheckpointError(_checkpoint_message(path, why)) from None


def _checkpoint_message(path: Path, why: str) -> str:
    return (
        f"cannot load {path}: {why}. If it came from someone else, get the file again; if a copy was "
        f"interrupted, copy it again. To start over, delete {path.parent} (or train into a new folder "
        "with `dinokit pretrain --out NEW_DIR`)."
    )


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG}); train with `dinokit pretrain`")
    return Config.load(path)


def run_info(run_dir: str | Path) -> dict:
    """``run_info.json`` as a dict (empty when the run has not started)."""
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def run_progress(run_dir: str | Path) -> tuple[int, int]:
    """(iterations done, iterations planned); (0, 0) when nothing was trained yet."""
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    if not (run_dir / CHECKPOINT).is_file() or not info:
        return 0, 0
    done = int(load_checkpoint(run_dir / CHECKPOINT, mmap=True)["iteration"])
    return done, int(info["total_iters"])


def is_finished(run_dir: str | Path) -> bool:
    """Trained to the end of its planned iterations."""
    done, total = run_progress(run_dir)
    return bool(total) and done >= total


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metrics log as a list of dicts (step records and kNN records, by iteration)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: skip it
            continue
    return out


def load_backbone(run_dir: str | Path, which: str = "teacher", device: str | torch.device = "cpu"):
    """The run's teacher (or student) backbone in eval mode, ready for feature extraction."""
    from dinokit.models.ssl import build_architecture

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    cfg = run_config(run_dir)
    model = build_architecture(cfg.model, cfg.crops.global_size)
    path = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(path)
    if not isinstance(state, dict) or which not in state:
        raise CheckpointError(_checkpoint_message(path, f"it has no {which!r} weights (not a dinokit checkpoint?)"))
    try:
        model.load_state_dict(state[which])
    except RuntimeError as exc:
        raise RunError(
            f"the checkpoint in {run_dir} does not fit the architecture in its {CONFIG} ({str(exc)[:200]}); "
            f"was {CONFIG} edited or copied from another run?"
        ) from None
    return model.backbone.to(device).eval()


def check_data(run_dir: str | Path, split_sha256: str, data_root: str | Path | None = None) -> None:
    """Stop with a message naming the fix when the data in use is not the data the run was trained on."""
    info = run_info(run_dir)
    expected = info.get("split_sha256")
    if not expected or expected == split_sha256:
        return
    trained_on = info.get("data_root", "another dataset")
    now = f" ({data_root})" if data_root else ""
    preset = info.get("preset") or run_config(run_dir).preset
    name = Path(run_dir).name
    if data_root is not None and str(data_root) == trained_on:
        raise DataMismatchError(
            f"the images in {data_root} changed since {name} was trained on them (split sha256 now "
            f"{split_sha256[:12]}…, then {expected[:12]}…): a regenerated embedded dataset or edited files. The run "
            f"no longer matches its data: delete {run_dir} and train it again."
        )
    back = (
        "unset DINOKIT_DATA (the run used the embedded dataset)"
        if info.get("dataset") == "embedded"
        else f"set DINOKIT_DATA or --data to {trained_on}"
    )
    raise DataMismatchError(
        f"the data in use now{now}, split sha256 {split_sha256[:12]}…, is not the one {name} was "
        f"trained on ({trained_on}, split sha256 {expected[:12]}…). Either use the run's data again: {back}, "
        "with the same data.val_fraction and data.split_seed; or train a run on this data: "
        f"`dinokit pretrain --preset {preset}` writes to runs/{preset}-<dataset>/."
    )

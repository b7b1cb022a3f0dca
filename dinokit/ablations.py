"""Ablations side by side: short runs that each switch one piece of DINOv2 off, with kNN curves.

Each variant is the same short run with a few overrides; it trains into its own folder under
``runs/ablations/`` and is skipped when already finished, so re-running a notebook only plots.
An interrupted variant resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dinokit import paths, runs
from dinokit.config import make_config
from dinokit.data.source import data_tag

# What each switch shows (notebook 03 asks the questions):
VARIANTS: dict[str, list[str]] = {
    "full DINOv2": [],
    "no local crops": ["crops.n_local=0"],
    "no centering (sharpening only)": ["loss.normalization=none"],
    "teacher momentum 0.9": ["optim.momentum_teacher=0.9", "optim.momentum_teacher_end=0.9"],
    "KoLeo off": ["loss.koleo_weight=0"],
    "iBOT off": ["loss.ibot_weight=0"],
    "Sinkhorn-Knopp instead of centering": ["loss.normalization=sinkhorn"],
}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def ablation_dir(preset: str, name: str, overrides: Sequence[str] = ()) -> Path:
    cfg = make_config(preset, list(overrides))
    return paths.runs_dir() / "ablations" / f"{preset}-{data_tag(cfg)}" / _slug(name)


def run_ablations(
    preset: str,
    variants: Mapping[str, Sequence[str]] | None = None,
    common: Sequence[str] = (),
    device: str = "auto",
) -> dict[str, Path]:
    """Train (or reuse) every variant; returns {variant name: run folder}."""
    from dinokit.train.loop import pretrain

    out = {}
    for name, overrides in (variants or VARIANTS).items():
        cfg = make_config(preset, [*common, *overrides])
        run_dir = ablation_dir(preset, name, common)
        done, total = runs.run_progress(run_dir)
        if not total or done < total:
            print(f"ablation {name!r}: training into {run_dir}", flush=True)
            pretrain(cfg, out_dir=run_dir, resume=done > 0, device=device)
        out[name] = run_dir
    return out


def knn_curves(run_dirs: Mapping[str, Path]) -> dict[str, list[tuple[int, float]]]:
    """{variant: [(iteration, kNN top-1 %)]} from each run's metrics log."""
    return {
        name: [(m["iteration"], m["knn_top1"]) for m in runs.read_metrics(path) if "knn_top1" in m]
        for name, path in run_dirs.items()
    }

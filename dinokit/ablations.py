"""Ablations side by side: short runs that each switch one piece of DINOv2 off, with kNN curves.

Each variant is the same short run with a few overrides, on the embedded dataset (an exercise for
a laptop, whatever ``DINOKIT_DATA`` says); it trains into its own folder under ``runs/ablations/``
and is skipped when already finished, so re-running a notebook only plots. An interrupted variant
resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dinokit import paths, runs
from dinokit.config import make_config

# The short run every variant shares, per preset: fixed epochs (no time budget, so the variants are
# comparable), a kNN check every epoch. For cpu-demo 2-3 minutes per variant on 2 cores (all seven:
# 18 minutes on a 2-core Xeon, fp32).
SHORT_RUN = {
    "ci": ["train.knn_every_epochs=1"],
    "cpu-demo": ["train.time_budget_min=0", "optim.epochs=4", "train.knn_every_epochs=1"],
}

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


def _embedded(preset: str, common: Sequence[str]) -> list[str]:
    """The shared overrides, pinned to the embedded dataset of the preset's size (generated if needed:
    a pinned ``data.root`` is read as given, never generated)."""
    from dinokit.data.synth import ensure_embedded

    data = make_config(preset, list(common)).data
    root = paths.embedded_dataset_dir(data.synth_per_class, data.synth_size)
    ensure_embedded(root, data.synth_per_class, data.synth_size)
    return [*common, f"data.root={root}"]


def ablation_key(name: str) -> str:
    """The variant's key in recorded results (``notebooks/expectations.json``)."""
    return "ablation_" + "_".join(part for part in _slug(name).split("-") if part)


def ablation_dir(preset: str, name: str) -> Path:
    return paths.runs_dir() / "ablations" / f"{preset}-embedded" / _slug(name)


def reference_lines(preset: str, device: str = "auto") -> dict[str, float]:
    """kNN of a random network of the ablations' shape, and chance: the floor of the ablation plot."""
    from dinokit.data.source import prepare_split
    from dinokit.device import resolve_device
    from dinokit.models.ssl import random_init_backbone
    from dinokit.train.loop import knn_monitor

    cfg = make_config(preset, _embedded(preset, SHORT_RUN.get(preset, [])))
    split = prepare_split(cfg, progress=False)
    knn = knn_monitor(random_init_backbone(cfg), split, cfg, resolve_device(device))["top1"]
    return {"random init": knn, "chance": 100 / len(split.classes)}


def run_ablations(
    preset: str,
    variants: Mapping[str, Sequence[str]] | None = None,
    device: str = "auto",
) -> dict[str, Path]:
    """Train (or reuse) every variant of the preset's short run; returns {variant name: run folder}.

    An interrupted variant ends the loop: the next call resumes it, then trains the rest.
    """
    from dinokit.notebook import ensure_trained

    common = _embedded(preset, SHORT_RUN.get(preset, []))
    out = {}
    for name, overrides in (variants or VARIANTS).items():
        out[name] = run_dir = ablation_dir(preset, name)
        print(f"ablation {name!r} -> {run_dir}", flush=True)
        if ensure_trained(make_config(preset, [*common, *overrides]), run_dir, device=device) != "finished":
            break
    return out


def knn_curves(run_dirs: Mapping[str, Path]) -> dict[str, list[tuple[int, float]]]:
    """{variant: [(iteration, kNN top-1 %)]} from each run's metrics log."""
    return {
        name: [(m["iteration"], m["knn_top1"]) for m in runs.read_metrics(path) if "knn_top1" in m]
        for name, path in run_dirs.items()
    }

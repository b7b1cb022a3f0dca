"""Reading a finished (or interrupted) run directory back: config, backbone, metrics, status."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dinokit.config import Config
from dinokit.models.ssl import build_architecture
from dinokit.models.vit import VisionTransformer
from dinokit.train.checkpoint import load_checkpoint


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); train with `dinokit pretrain`")
    return Config.load(path)


def run_progress(run_dir: str | Path) -> tuple[int, int]:
    """(iterations done, iterations planned); (0, 0) when nothing was trained yet."""
    run_dir = Path(run_dir)
    info = run_dir / "run_info.json"
    if not (run_dir / "checkpoint.pt").is_file() or not info.is_file():
        return 0, 0
    total = json.loads(info.read_text())["total_iters"]
    done = int(load_checkpoint(run_dir / "checkpoint.pt", mmap=True)["iteration"])
    return done, total


def load_backbone(run_dir: str | Path, which: str = "teacher", device: str | torch.device = "cpu") -> VisionTransformer:
    """The run's teacher (or student) backbone, ready for feature extraction."""
    cfg = run_config(run_dir)
    model = build_architecture(cfg.model, cfg.crops.global_size)
    state = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    model.load_state_dict(state[which])
    return model.backbone.to(device).eval()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metrics log as a list of dicts (step records and kNN records, by iteration)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

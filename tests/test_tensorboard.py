"""``train.tensorboard=true``: the same scalars as metrics.jsonl, through PyTorch's own writer (optional)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dinokit.config import make_config
from dinokit.train import services
from dinokit.train.loop import pretrain
from dinokit.train.services import MetricsLog


class RecordingWriter:
    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        RecordingWriter.last = self

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))

    def close(self) -> None:
        self.closed = True


def test_the_board_gets_the_numbers_of_metrics_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "summary_writer_class", lambda: RecordingWriter)
    log = MetricsLog(tmp_path / "metrics.jsonl", torch.device("cpu"), 10, 0, True, tmp_path / "tensorboard")
    log.write({"iteration": 5, "epoch": 0, "loss_dino": 1.5, "lr": 1e-3, "finite": True, "kernel": "flash"})
    log.close()
    board = RecordingWriter.last
    assert board.log_dir == str(tmp_path / "tensorboard") and board.closed
    assert board.scalars == [("epoch", 0, 5), ("loss_dino", 1.5, 5), ("lr", 1e-3, 5)]  # numbers only, no flags
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss_dino"] == 1.5


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_without_the_package_the_run_says_what_to_install_before_any_work(env: Path) -> None:
    with pytest.raises(ValueError, match="pip install tensorboard"):
        pretrain(make_config("ci", {"train.tensorboard": True}), out_dir=env / "runs" / "tb")
    assert not (env / "runs" / "tb").exists()

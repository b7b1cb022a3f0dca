"""``dinokit export``: the teacher loads through timm's own pretrained path and gives the same features."""

import json
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.config import make_config
from dinokit.runs import load_backbone
from dinokit.train.loop import pretrain


@pytest.mark.parametrize("registers", [0, 2])
def test_an_exported_run_loads_through_timm_with_the_same_features(env: Path, registers: int) -> None:
    timm = pytest.importorskip("timm")
    cfg = make_config("ci", {"train.max_iters": 2, "model.n_registers": registers, "model.layerscale": 0.1})
    run = pretrain(cfg, out_dir=env / "r", device="cpu").run_dir
    assert main(["export", str(run)]) == 0
    out = run / "export"
    kw = json.loads((out / "timm_kwargs.json").read_text())
    model = timm.create_model(pretrained=True, pretrained_cfg_overlay={"file": str(out / "model.safetensors")}, **kw)
    ours = load_backbone(run)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        theirs = model.eval().forward_features(x)
        mine = ours.forward_features(x)
    r = 1 + registers
    assert torch.allclose(theirs[:, 0], mine["cls"], atol=1e-5)  # CLS
    assert torch.allclose(theirs[:, r:], mine["patch"], atol=1e-5)  # patch tokens
    card = (out / "MODEL_CARD.md").read_text()
    assert json.loads((run / "run_info.json").read_text())["split_sha256"] in card and "timm.create_model" in card

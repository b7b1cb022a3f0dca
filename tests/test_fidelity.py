"""Where dinokit once differed from facebookresearch/dinov2: each fix with a test that fails without it."""

import ast
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.config import LossConfig, make_config
from dinokit.losses.objective import DINOv2Objective
from dinokit.losses.teacher_norm import Centering
from dinokit.models.pos_embed import interpolate_pos_embed
from dinokit.models.pretrained import load_timm_vit_weights
from dinokit.models.vit import build_vit
from dinokit.runs import CheckpointError, load_checkpoint, save_atomic
from dinokit.train.loop import TrainingDiverged, pretrain


def test_a_centre_update_with_no_rows_keeps_the_centre() -> None:
    centre = Centering(4, momentum=0.9)
    centre.update(torch.ones(3, 4))
    before = centre.center.clone()
    centre.update(torch.empty(0, 4))  # iBOT with no masked patch in the global batch
    assert torch.isfinite(centre.center).all() and torch.equal(centre.center, before)


def test_a_batch_with_no_masked_crop_trains_on(env: Path) -> None:
    """Before the fix, the iBOT centre became 0/0 = NaN and the run stopped as 'diverged'."""
    objective = DINOv2Objective(LossConfig(), out_dim=8)
    w = torch.randn(8, 3)
    student = {"dino_global": torch.randn(4, 3), "cls": torch.randn(4, 6), "ibot": torch.randn(2, 3)}
    teacher = {"dino_global": torch.randn(4, 3), "ibot": torch.randn(2, 3)}
    for out in (student, teacher):
        out.update(dino_prototypes=w, ibot_prototypes=w)
    loss, logs = objective(student, teacher, torch.zeros(2), teacher_temp=0.04)  # two padding rows, no real one
    assert torch.isfinite(loss) and logs["loss_ibot"] == 0.0
    assert torch.isfinite(objective.ibot_center.center).all()
    # the same end to end: no crop is ever masked, batch 2
    result = pretrain(make_config("ci", {"masks.probability": 0.0, "optim.batch_size": 2, "train.max_iters": 6}))
    assert result.status == "finished"


def test_the_user_report_batch_2_trains(env: Path) -> None:
    """`dinokit pretrain --preset ci --set optim.batch_size=2` stopped with NaN at iteration 3."""
    assert main(["pretrain", "--preset", "ci", "--set", "optim.batch_size=2", "train.max_iters=12"]) == 0


def test_per_module_clipping_leaves_a_small_backbone_gradient_alone() -> None:
    from dinokit.models.ssl import build_ssl_model
    from dinokit.train.step import clipped_modules

    model = build_ssl_model(make_config("ci").model, 32)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    backbone_grad = next(model.backbone.parameters()).grad
    backbone_grad.fill_(0.01)  # backbone norm well under 3
    next(model.dino_head.parameters()).grad.fill_(1000.0)  # a huge head gradient
    before = backbone_grad.clone()
    norms = {
        name: float(torch.nn.utils.clip_grad_norm_(m.parameters(), 3.0)) for name, m in clipped_modules(model).items()
    }
    assert norms["dino_head"] > 3.0 and norms["backbone"] < 3.0
    assert torch.equal(backbone_grad, before)  # untouched (one global clip would have shrunk it ~1000x)
    assert torch.nn.utils.get_total_norm([p.grad for p in model.dino_head.parameters()]) <= 3.0 + 1e-4


def test_stochastic_depth_is_uniform_by_default_as_dinov2() -> None:
    from dinokit.models.ssl import build_ssl_model

    cfg = make_config("default")
    assert cfg.model.drop_path == 0.3 and cfg.model.drop_path_uniform  # ssl_default_config.yaml
    small = make_config("ci", {"model.drop_path": 0.2})
    rates = [b.drop_path_rate for b in build_ssl_model(small.model, 32).backbone.blocks]
    assert rates == [0.2, 0.2]
    ramp = make_config("ci", {"model.drop_path": 0.2, "model.drop_path_uniform": False})
    assert [b.drop_path_rate for b in build_ssl_model(ramp.model, 32).backbone.blocks] == [0.0, 0.2]


def test_divergence_names_the_term(env: Path, monkeypatch) -> None:
    from dinokit.losses import koleo

    real = koleo.KoLeoLoss.forward
    calls = {"n": 0}

    def poisoned(self, x):
        calls["n"] += 1
        return real(self, x) * (float("inf") if calls["n"] > 4 else 1.0)

    monkeypatch.setattr(koleo.KoLeoLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="KoLeo loss became non-finite at iteration 2") as err:
        pretrain(make_config("ci"), out_dir=env / "r")
    assert "loss.koleo_weight" in str(err.value)


def _evil_payload(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"iteration": 3, "x": Evil()})


def test_unloadable_checkpoints_get_a_message_and_never_run_code(env: Path, capsys) -> None:
    run = pretrain(make_config("ci", {"train.max_iters": 2})).run_dir
    ckpt = run / "checkpoint.pt"
    good = ckpt.read_bytes()
    marker = env / "pwned"
    cases = {
        "truncated": good[: len(good) // 2],
        "foreign": b"this is a text file from another program\n",
        "code": _evil_payload(marker),
    }
    for name, content in cases.items():
        ckpt.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"cannot load {ckpt}") as err:
            load_checkpoint(ckpt)
        assert "copy it again" in str(err.value), name
        for argv in (["eval", str(run)], ["attention", str(run)], ["pretrain", "--out", str(run), "--resume"]):
            assert main([*argv, "--device", "cpu"]) == 2, (name, argv)
            assert f"cannot load {ckpt}" in capsys.readouterr().err
        assert main(["report", str(run), "--out", str(env / "report")]) == 0  # the report never loads it
    assert "code" in str(err.value)  # the last case: the message says why
    assert not marker.exists()  # the payload never ran


def test_atomic_save_then_load_round_trips(tmp_path: Path) -> None:
    save_atomic({"a": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.equal(load_checkpoint(tmp_path / "x.pt")["a"], torch.arange(3))


# The run folder sits below train, eval, viz and report: none of these layers imports the trainer.
LAYERS = ("data", "models", "losses", "eval", "viz")
TOP_MODULES = ("runs.py", "report.py", "device.py", "precision.py", "paths.py", "config.py")


def test_only_the_trainer_and_entry_points_import_dinokit_train() -> None:
    root = Path(__file__).resolve().parent.parent / "dinokit"
    files = [f for layer in LAYERS for f in (root / layer).rglob("*.py")] + [root / m for m in TOP_MODULES]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "dinokit.train" or n.startswith("dinokit.train.") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert not offenders


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_evaluation_and_figures_depend_only_downward() -> None:
    """eval/ and viz/ share model functions (CLS attention, the random-init backbone) through
    models/, never through each other: neither imports the other."""
    root = Path(__file__).resolve().parent.parent / "dinokit"
    for here, other in (("eval", "viz"), ("viz", "eval")):
        offenders = [
            str(p.relative_to(root)) for p in (root / here).rglob("*.py")
            if any(n == f"dinokit.{other}" or n.startswith(f"dinokit.{other}.") for n in _imports(p))
        ]  # fmt: skip
        assert not offenders, f"{here}/ imports {other}/: {offenders}"


def _official_interpolate_pos_encoding(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The formula of dinov2/models/vision_transformer.py ``interpolate_pos_encoding`` (square source
    grid M, ``interpolate_offset=0.1``, ``interpolate_antialias=False``), written out independently."""
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    sx, sy = (rows + 0.1) / m, (cols + 0.1) / m  # the official code's "w0" is the row count
    grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=(sx, sy), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (rows, cols)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


@pytest.mark.parametrize(("old", "new"), [(28, (12, 12)), (28, (6, 6)), (37, (16, 16)), (28, (12, 20)), (8, (28, 28))])
def test_position_embeddings_interpolate_as_dinov2(old: int, new: tuple[int, int]) -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + old * old, 16)
    ours = interpolate_pos_embed(pos, (old, old), new)
    assert torch.allclose(ours, _official_interpolate_pos_encoding(pos, *new), atol=1e-6, rtol=0)
    assert interpolate_pos_embed(pos, (old, old), (old, old)) is pos  # same grid: untouched, as the official


def test_the_offset_matters_on_a_smooth_field() -> None:
    """Resizing to the target size (what dinokit did before) samples other points: on this field the
    two differ by 2.4 % (28 -> 12) and 4.6 % (28 -> 6) in relative L2 norm."""
    m = 28
    y, x = torch.meshgrid(torch.linspace(0, 1, m), torch.linspace(0, 1, m), indexing="ij")
    field = torch.stack([torch.sin(2 * math.pi * x), torch.cos(2 * math.pi * y), x * y, x + y], -1)
    pos = torch.cat([torch.zeros(1, 1, 4), field.reshape(1, m * m, 4)], dim=1)
    for n, expected in ((12, 0.024), (6, 0.046)):
        ours = interpolate_pos_embed(pos, (m, m), (n, n))[:, 1:]
        resized = torch.nn.functional.interpolate(field.permute(2, 0, 1)[None], size=(n, n), mode="bicubic")
        resized = resized[0].permute(1, 2, 0).reshape(1, n * n, 4)
        assert abs(float((ours - resized).norm() / resized.norm()) - expected) < 0.002


def test_official_weights_give_the_official_positions_at_the_models_size() -> None:
    """DINOv2's released ViT-S/14 has a 37 x 37 grid (518 px). Loaded into dinokit's ViT-S/14 at 224 px,
    the positions are those the official forward interpolates for a 224 px input, so the features are."""
    timm = pytest.importorskip("timm")
    reference = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, depth=1, num_classes=0)
    ours = build_vit("vit_small", patch_size=14, img_size=224, depth=1, layerscale=1e-5)
    load_timm_vit_weights(ours, reference.state_dict())
    official = _official_interpolate_pos_encoding(reference.state_dict()["pos_embed"], 16, 16)
    assert torch.allclose(ours.pos_embed.detach(), official, atol=1e-6, rtol=0)

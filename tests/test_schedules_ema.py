import math

import numpy as np
import torch
from torch import nn

from dinokit.config import make_config
from dinokit.train.param_groups import apply_schedules, build_param_groups, layer_id
from dinokit.train.schedules import build_schedules, cosine_schedule, scaled_lr, warmup_then_constant
from dinokit.train.teacher import build_teacher, ema_update


def test_cosine_schedule_by_hand() -> None:
    s = cosine_schedule(1.0, 0.0, total_iters=6, warmup_iters=2, warmup_start=0.0)
    # warm-up: linspace(0, 1, 2) = [0, 1]; cosine over 4 steps: (1 + cos(pi * i / 4)) / 2
    expected = [0.0, 1.0] + [(1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)]
    assert np.allclose(s, expected)
    assert len(cosine_schedule(0.04, 0.4, 10)) == 10
    assert np.isclose(cosine_schedule(0.04, 0.4, 10)[0], 0.04)


def test_teacher_temperature_warmup() -> None:
    s = warmup_then_constant(0.04, 0.07, total_iters=5, warmup_iters=4)
    assert np.allclose(s, [0.04, 0.05, 0.06, 0.07, 0.07])


def test_lr_scaling_rules() -> None:
    assert math.isclose(scaled_lr(4e-3, 1024, "sqrt"), 4e-3)
    assert math.isclose(scaled_lr(4e-3, 256, "sqrt"), 2e-3)  # DINOv2: sqrt(256 / 1024) = 0.5
    assert math.isclose(scaled_lr(5e-4, 512, "linear"), 1e-3)  # DINO: lr * batch / 256


def test_built_schedules_freeze_last_layer_and_reach_targets() -> None:
    cfg = make_config("ci", {"optim.epochs": 4, "optim.warmup_epochs": 1, "optim.freeze_last_layer_epochs": 1})
    s = build_schedules(cfg, iters_per_epoch=10, total_iters=40, global_batch=16)
    assert (s.last_layer_lr[:10] == 0).all() and (s.last_layer_lr[10:] > 0).all()
    assert s.lr.argmax() == 9  # peak at the end of warm-up
    assert math.isclose(s.momentum[0], cfg.optim.momentum_teacher) and s.momentum[-1] > 0.999
    assert math.isclose(s.weight_decay[0], cfg.optim.weight_decay) and s.weight_decay[-1] > 0.39


def test_a_run_capped_at_a_fifth_of_its_recipe_keeps_the_recipes_shape() -> None:
    """har-vits8's recipe: 100 epochs, lr warm-up 10, teacher temperature warm-up 30, prototypes
    frozen 1. A budget that trains 20 of them warms up over the same shares of its iterations."""
    ipe, recipe, capped = 50, make_config("har-vits8"), make_config("har-vits8", {"optim.epochs": 20})
    full = build_schedules(recipe, ipe, 100 * ipe, 64)
    short = build_schedules(capped, ipe, 20 * ipe, 64)  # no recipe recorded: the old behaviour
    assert short.lr.argmax() == 10 * ipe - 1 and short.teacher_temp.argmax() == 20 * ipe - 1  # half, all of it
    capped.optim.recipe_epochs = 100  # what the time budget records when it cuts the run short
    scaled = build_schedules(capped, ipe, 20 * ipe, 64)
    for name in ("lr", "teacher_temp"):
        peak_full = (getattr(full, name).argmax() + 1) / len(getattr(full, name))
        peak_scaled = (getattr(scaled, name).argmax() + 1) / len(getattr(scaled, name))
        assert math.isclose(peak_full, peak_scaled), name  # 10 % and 30 % of the run
    assert math.isclose(scaled.teacher_temp[int(0.3 * 20 * ipe) - 1], capped.loss.teacher_temp)
    assert (scaled.last_layer_lr[: ipe // 5] == 0).all() and scaled.last_layer_lr[ipe // 5] > 0
    assert math.isclose(scaled.momentum[-1], full.momentum[-1], rel_tol=1e-6)  # cosines span the run


def test_ema_update_by_hand() -> None:
    student = nn.Linear(2, 1)
    teacher = build_teacher(student)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    ema_update(teacher, student, momentum=0.75)  # 0.75 * 1 + 0.25 * 3 = 1.5
    assert torch.allclose(teacher.weight, torch.full((1, 2), 1.5))
    assert not any(p.requires_grad for p in teacher.parameters())
    ema_update(teacher, student, momentum=1.0)  # momentum 1: frozen
    assert torch.allclose(teacher.weight, torch.full((1, 2), 1.5))


def test_layer_ids_and_param_groups() -> None:
    from dinokit.models.ssl import build_ssl_model

    assert layer_id("backbone.cls_token", 12) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.blocks.3.attn.qkv.weight", 12) == 4
    assert layer_id("dino_head.mlp.0.weight", 12) == 13
    cfg = make_config("ci")
    model = build_ssl_model(cfg.model, 32)
    groups = build_param_groups(model, depth=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_mult"] == 0.5**2
    assert math.isclose(by_name["backbone.patch_embed.proj.weight"]["lr_mult"], 0.5**3 * 0.2)
    assert by_name["backbone.norm.weight"]["wd_mult"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.bias"]["wd_mult"] == 0.0
    # As dinov2/utils/param_groups.py: the tokens and the prototypes' norm scale are decayed.
    assert by_name["backbone.pos_embed"]["wd_mult"] == 1.0
    assert by_name["backbone.cls_token"]["wd_mult"] == 1.0
    assert by_name["dino_head.last_layer.parametrizations.weight.original0"]["wd_mult"] == 1.0
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["wd_mult"] == 1.0
    last = [g for g in groups if g["is_last_layer"]]
    assert last and all("last_layer" in n for g in last for n in g["names"])
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    apply_schedules(opt, lr=1.0, wd=0.1, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else g["lr_mult"])
        assert g["weight_decay"] == 0.1 * g["wd_mult"]

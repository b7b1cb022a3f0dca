"""``dinokit export RUN``: the student's pre-trained model, usable outside the kit.

Writes, into ``RUN/export/``:

* ``model.safetensors``: the teacher backbone with timm's parameter names (dinokit's ViT already
  uses them; the iBOT mask token, which timm's ViT lacks, is left out);
* ``timm_kwargs.json``: the arguments that make timm build the same network;
* ``MODEL_CARD.md``: what it was trained on (data, split checksum), how long, and its results.

Loading it anywhere timm is installed::

    import json, timm
    kw = json.load(open("RUN/export/timm_kwargs.json"))
    model = timm.create_model(pretrained=True, pretrained_cfg_overlay={"file": "RUN/export/model.safetensors"}, **kw)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from dinokit import runs
from dinokit.models.vit import VisionTransformer

EXPORT = "export"
SKIPPED = ("mask_token",)  # trained for iBOT, not part of an image encoder


def timm_kwargs(backbone: VisionTransformer, img_size: int) -> dict:
    """``timm.create_model`` arguments for the same architecture, features only (no classifier)."""
    block = backbone.blocks[0]
    gamma = getattr(block.ls1, "gamma", None)
    p = backbone.patch_size
    kwargs = {
        "model_name": f"vit_small_patch{p if p in (8, 16, 32) else 16}_224",  # the sizes below override its own
        "img_size": img_size, "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim,
        "depth": len(backbone.blocks), "num_heads": backbone.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / backbone.embed_dim, "num_classes": 0,
        "reg_tokens": backbone.n_registers,
        "no_embed_class": True,  # positions on the patches only; the CLS position is folded into its token
    }  # fmt: skip
    if gamma is not None:
        kwargs["init_values"] = 1e-5  # any value: LayerScale exists, the file holds the trained gammas
    return kwargs


def timm_state_dict(backbone: VisionTransformer) -> dict:
    """dinokit's weights under timm's names and conventions. dinokit adds the CLS token's position
    to it and registers get none (as DINOv2); timm's ``no_embed_class`` ViT adds positions to the
    patches only, so the CLS position is folded into the CLS token: the same numbers either way."""
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items() if k not in SKIPPED}
    state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    state["pos_embed"] = state["pos_embed"][:, 1:].contiguous()
    return state


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the run's teacher backbone, its timm arguments and a model card; returns the folder."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / EXPORT
    cfg = runs.run_config(run_dir)
    backbone = runs.load_backbone(run_dir, "teacher")
    state = timm_state_dict(backbone)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": "dinokit"})
    kwargs = timm_kwargs(backbone, cfg.crops.global_size)
    (out / "timm_kwargs.json").write_text(json.dumps(kwargs, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(run_dir, kwargs))
    return out


def model_card(run_dir: Path, kwargs: dict) -> str:
    info, cfg = runs.run_info(run_dir), runs.run_config(run_dir)
    done, total = runs.run_progress(run_dir)
    metrics_path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    lines = [
        f"# {run_dir.name}: a DINOv2-pre-trained ViT ({kwargs['embed_dim']}-d, {kwargs['depth']} blocks, "
        f"patch {kwargs['patch_size']})",
        "",
        "Self-supervised DINOv2 pre-training with dinokit (DINO + iBOT + KoLeo, EMA teacher); this is the teacher.",
        "",
        f"* data: {info.get('dataset', '?')} ({info.get('n_pretrain_images', '?')} pre-training images, "
        f"{len(info.get('classes', []))} classes)",
        f"* split sha256: `{info.get('split_sha256', '?')}` (the held-out images never reached pre-training)",
        f"* training: preset `{cfg.preset}`, {done} of {total} iterations, {cfg.optim.epochs} epochs, global batch "
        f"{info.get('global_batch', '?')}, {info.get('precision', '?')} on {info.get('device_name', '?')}",
        f"* crops: 2 x {cfg.crops.global_size} px + {cfg.crops.n_local} x {cfg.crops.local_size} px",
    ]
    for name in ("knn", "linear"):
        if name in metrics:
            lines.append(f"* held-out {name}: top-1 {metrics[name]['top1']:.1f} %")
    if not metrics:
        lines.append("* results: not evaluated yet (`dinokit eval RUN`, then export again)")
    lines += [
        "",
        "Load with timm:",
        "",
        "```python",
        "import json, timm",
        'kw = json.load(open("timm_kwargs.json"))',
        'model = timm.create_model(pretrained=True, pretrained_cfg_overlay={"file": "model.safetensors"}, **kw)',
        "```",
        "",
    ]
    return "\n".join(lines)

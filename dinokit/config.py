"""One dataclass config for a run, named presets, and ``key=value`` overrides.

The resolved config is saved as ``config.json`` in every run directory, so a run can always be
re-created or resumed from its own folder.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    root: str = ""  # empty: DINOKIT_DATA, else the embedded dataset (generated on demand)
    val_fraction: float = 0.2
    split_seed: int = 0
    use_unlabeled: bool = True  # unlabelled test images join pre-training (never the val split)
    num_workers: int = 0
    # Where multi-crop runs: "loader" (per image, PIL, in the loader workers) or "device" (batched on
    # the training device; the loader only decodes). "auto" = device: faster on every device measured.
    augment_on: str = "auto"
    max_images: int = 0  # 0 = all; small values make tiny test runs
    synth_per_class: int = 300  # size of the embedded dataset when it must be generated
    synth_size: int = 64


@dataclass
class CropConfig:
    # DINOv2 defaults (dinov2/configs/ssl_default_config.yaml): 2 global 224 px, 8 local 96 px.
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    # Blur probability of global crop 1, global crop 2, local crops: the papers' 1.0 / 0.1 / 0.5.
    # The official code effectively applies 0.0 / 0.9 / 0.5 (see dinokit/data/crops.py).
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    # Blur sigma range in px, for a 9 px kernel at every crop size: DINOv2's (0.1, 2.0).
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    eval_size: int = 224
    # Image size for attention maps and their Jaccard score (0: eval_size). Positions interpolate,
    # so a small model trained on 48 px crops can be asked for 12 x 12 maps at 96 px.
    attention_size: int = 0

    @property
    def attention_image_size(self) -> int:
        """The size attention maps and their Jaccard score are computed at."""
        return self.attention_size or self.eval_size


@dataclass
class MaskConfig:
    # DINOv2 paper: iBOT masks on half of the global crops, ratio spread over [0.1, 0.5].
    probability: float = 0.5
    ratio_min: float = 0.1
    ratio_max: float = 0.5


@dataclass
class ModelConfig:
    arch: str = "vit_small"
    patch_size: int = 8
    embed_dim: int = 0  # 0: from ``arch``
    depth: int = 0
    num_heads: int = 0
    n_registers: int = 0
    layerscale: float = 1e-5  # DINOv2 init value for LayerScale; 0 disables it
    # Stochastic depth of the student (the teacher has none): DINOv2's ssl_default_config.yaml
    # uses drop_path_rate 0.3 in every block (drop_path_uniform: true); false ramps 0 -> rate.
    drop_path: float = 0.3
    drop_path_uniform: bool = True
    efficient_drop_path: bool = True
    attention: str = "sdpa"
    init: str = "random"  # "random" | "dinov2" (official weights via timm)
    head_prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_norm_last_layer: bool = False  # True: DINO v1's frozen prototype norm g = 1; False: DINOv2 trains g
    ibot_separate_head: bool = False


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    normalization: str = "centering"  # "centering" | "sinkhorn" | "none" (sharpening only: an ablation)
    center_momentum: float = 0.9
    sinkhorn_iters: int = 3


@dataclass
class OptimConfig:
    epochs: int = 100
    batch_size: int = 64  # per process
    base_lr: float = 4e-3  # DINOv2: lr = base_lr * sqrt(global_batch / 1024)
    lr_scaling: str = "sqrt"  # "sqrt" (DINOv2) | "linear" (DINO, per 256) | "none"
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    clip_grad: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: int = 1
    # The recipe's length when a time budget trained fewer epochs (0: optim.epochs is the recipe).
    # The warm-ups and the prototype freeze then keep their share of the run, not their length.
    recipe_epochs: int = 0
    # Iterations in one schedule "epoch" (0: one pass over the data). DINOv2's recipes count epochs of
    # OFFICIAL_EPOCH_LENGTH = 1,250 iterations whatever the dataset; set 1250 to read them that way.
    epoch_length: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    compile: bool = False
    fsdp: bool = False
    grad_checkpointing: bool = False  # recompute each block in the backward: far less memory, ~30 % more time
    iters_per_epoch: int = 0  # iterations per pass over the data; 0: images // global batch
    max_iters: int = 0  # 0: optim.epochs * the epoch's iterations (optim.epoch_length, or one pass)
    # > 0: time a few steps first and train optim.epochs, or as many as fit in this many minutes
    # (steps, kNN checks, checkpoints) if fewer. The chosen optim.epochs is written to the run's
    # config.json (and this set to 0).
    time_budget_min: float = 0.0
    log_every: int = 10
    checkpoint_every: int = 200
    knn_every_epochs: int = 5
    knn_k: int = 20
    knn_temperature: float = 0.07
    num_threads: int = 0  # 0: leave torch's default
    tensorboard: bool = False  # also write metrics.jsonl's scalars as TensorBoard events (RUN/tensorboard/)


@dataclass
class Config:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        cfg = cls()
        for section, content in values.items():
            if isinstance(content, dict):
                for key, value in content.items():
                    apply_override(cfg, f"{section}.{key}", value)
            else:
                apply_override(cfg, section, content)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


# Each preset is a list of overrides on top of the defaults above (which are the GPU recipe).
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests and nbval. Learns nothing; exercises every code path.
    "ci": {
        "data.max_images": 96,
        "data.synth_per_class": 12,
        "data.synth_size": 32,
        "crops.global_size": 32,
        "crops.local_size": 16,
        "crops.n_local": 2,
        "crops.eval_size": 32,
        "model.arch": "vit_pico",
        "model.head_prototypes": 128,
        "model.head_hidden": 64,
        "model.head_bottleneck": 32,
        "model.drop_path": 0.1,
        "optim.epochs": 2,
        "optim.batch_size": 16,
        "optim.warmup_epochs": 1,
        "loss.warmup_teacher_temp_epochs": 1,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.knn_every_epochs": 1,
        "train.precision": "fp32",
    },
    # The demo on a laptop CPU, on the embedded dataset: 4 epochs, or fewer where they do not fit a
    # time budget, so the whole `make demo` fits a quarter of an hour on slow and fast machines
    # alike (README, "The cpu-demo preset, and how it was found"). Not more epochs on a fast
    # machine: in an 8-epoch run kNN gained < 1 point after epoch 4 while the attention drifted off
    # the figure (Jaccard on the whole image 42.4 % at epoch 2, 36.9 % at 4, 30.0 % at 8 in a run
    # with 4 local crops; random init 20.3 %). Small ViT (width 128, 4 blocks, patch 8 on 48 px
    # crops, 256 prototypes); batch 32 for more updates per minute; a fixed lr of 5e-4 (DINOv2's
    # sqrt rule is meant for long runs); a faster teacher (momentum 0.98 -> 1) and no frozen
    # prototypes, since the whole run is a few epochs; teacher temperature 0.04 throughout (no time
    # for a warm-up; 0.06 lowered the attention Jaccard on both seeds tried, README "how it was
    # found"); 6 local crops (the attention finds the figure better than with 4); crops
    # augmented on the device (1.8x the per-image pipeline here); attention maps drawn at 96 px
    # (12 x 12 patches, the whole image). fp32, not auto: at width 128 bf16 autocast's
    # casts cost more than its matmuls save (0.73x fp32 on an AVX512-BF16 Xeon,
    # benchmarks/step_throughput.py).
    "cpu-demo": {
        "data.synth_per_class": 300,
        "data.synth_size": 64,
        "data.augment_on": "device",
        "crops.global_size": 48,
        "crops.local_size": 24,
        "crops.n_local": 6,
        "crops.eval_size": 48,
        "crops.attention_size": 96,
        "crops.global_scale": (0.35, 1.0),
        "crops.local_scale": (0.1, 0.4),
        "model.arch": "vit_mini",
        "model.head_prototypes": 256,
        "model.head_hidden": 512,
        "model.head_bottleneck": 128,
        "model.drop_path": 0.0,
        "model.layerscale": 0.0,
        "optim.epochs": 4,  # the most the time budget trains
        "optim.batch_size": 32,
        "optim.lr_scaling": "none",
        "optim.base_lr": 5e-4,
        "optim.warmup_epochs": 1,
        "optim.momentum_teacher": 0.98,
        "optim.layerwise_decay": 1.0,
        "optim.patch_embed_lr_mult": 1.0,
        "optim.freeze_last_layer_epochs": 0,
        "loss.warmup_teacher_temp": 0.04,
        "loss.teacher_temp": 0.04,
        "train.time_budget_min": 5.5,
        "train.precision": "fp32",
        "train.log_every": 5,
        "train.checkpoint_every": 100,
        "train.knn_every_epochs": 2,
    },
    # The assignment on one GPU: ViT-S/8, 2 x 224 + 8 x 96 crops (DINOv2 defaults).
    "har-vits8": {
        "model.arch": "vit_small",
        "model.patch_size": 8,
        "optim.epochs": 100,
        "optim.batch_size": 64,
        "data.num_workers": 8,
        "train.checkpoint_every": 500,
        "train.knn_every_epochs": 10,
    },
    # The assignment on a 16 GB card (T4, V100-16GB, P100): half the batch (the lr follows by DINOv2's
    # sqrt rule) and activation checkpointing; ~12 GB instead of ~45 (benchmarks/estimate_gpu_budget.py).
    "har-vits8-16gb": {
        "model.arch": "vit_small",
        "model.patch_size": 8,
        "optim.epochs": 100,
        "optim.batch_size": 32,
        "train.grad_checkpointing": True,
        "data.num_workers": 4,
        "train.checkpoint_every": 1000,
        "train.knn_every_epochs": 10,
    },
    # Same, starting from the official DINOv2 ViT-S/14 weights resampled to patch 8.
    "har-vits8-dinov2init": {
        "model.arch": "vit_small",
        "model.patch_size": 8,
        "model.init": "dinov2",
        "model.n_registers": 0,
        "optim.epochs": 30,
        "optim.base_lr": 1e-3,
        "optim.warmup_epochs": 2,
        "optim.momentum_teacher": 0.996,
        "loss.warmup_teacher_temp_epochs": 0,
        "data.num_workers": 8,
        "train.checkpoint_every": 500,
        "train.knn_every_epochs": 5,
    },
}


def _parse_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.field`` on ``cfg``, converting ``value`` to the field's type."""
    parts = key.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if not hasattr(target, part):
            raise KeyError(f"unknown config section {part!r} in {key!r}")
        target = getattr(target, part)
    name = parts[-1]
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields:
        known = ", ".join(sorted(fields))
        raise KeyError(f"unknown config key {key!r}; {'.'.join(parts[:-1]) or 'top level'} has: {known}")
    current = getattr(target, name)
    value = _parse_value(value)
    if isinstance(current, bool):
        value = bool(value)
    elif isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key} expects an integer, got {value!r}")
        value = int(value)
    elif isinstance(current, float):
        value = float(value)
    elif isinstance(current, tuple):
        value = tuple(float(v) for v in value)
    elif isinstance(current, str):
        value = str(value)
    setattr(target, name, value)


def make_config(preset: str = "default", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset, then the user's ``key=value`` overrides."""
    if preset != "default" and preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for key, value in PRESETS.get(preset, {}).items():
        apply_override(cfg, key, value)
    items: list[tuple[str, Any]]
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides or []:
            if "=" not in text:
                raise ValueError(f"override {text!r} must look like section.key=value")
            key, value = text.split("=", 1)
            items.append((key.strip(), value.strip()))
    for key, value in items:
        apply_override(cfg, key, value)
    return cfg

"""Setting up a pre-training run: its data and loader, its networks and optimizer, its resume.

:func:`dinokit.train.loop.pretrain` calls these in order; each returns a small record of what it
built, so the loop reads what it uses by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from dinokit import runs
from dinokit.config import Config
from dinokit.data.batch_crops import choose_augment_on, device_augmentation
from dinokit.data.crops import MultiCrop
from dinokit.data.images import BadImage, load_rgb
from dinokit.data.loader import EpochSampler, MultiCropCollate, MultiCropDataset
from dinokit.data.source import prepare_split, resolve_data_root
from dinokit.data.split import Split
from dinokit.losses.objective import DINOv2Objective
from dinokit.models.compile import compile_blocks
from dinokit.models.lean_branch import lean_branches_pay, set_lean_branches
from dinokit.models.ssl import SSLModel, build_architecture, build_ssl_model
from dinokit.precision import grad_scaler
from dinokit.train.checkpoint import set_rng_state
from dinokit.train.dist import DistInfo
from dinokit.train.fsdp import load_full_state, shard
from dinokit.train.optimizer import build_optimizer
from dinokit.train.teacher import build_teacher

log = logging.getLogger("dinokit.train")


@dataclass
class TrainData:
    split: Split
    data_root: Path
    records: list
    global_batch: int
    iters_per_epoch: int  # one schedule epoch (optim.epoch_length, or a pass over the data)
    iters_per_pass: int  # one pass over the data: the sampler's epoch
    loader: DataLoader
    sampler: EpochSampler
    batch_crops: nn.Module | None  # crops cut on the device (None: the loader cuts them)
    augment_on: str


def loader_options(num_workers: int, device_type: str) -> dict:
    """Workers live for the whole run (one pass over all its iterations, so no re-fork at epoch
    boundaries) and keep a few batches ready; batches are pinned for asynchronous copies to a GPU."""
    options: dict = {"num_workers": num_workers, "pin_memory": device_type == "cuda"}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def build_data(cfg: Config, dist_info: DistInfo, device: torch.device) -> TrainData:
    """The fixed split (held-out images never reach pre-training), the sampler and the loader."""
    data_root = resolve_data_root(cfg)
    split = prepare_split(cfg, progress=dist_info.is_main)
    # data without labels (a plain folder of images) pre-trains on its unlabelled images whatever the setting
    records = split.train + (split.unlabeled if cfg.data.use_unlabeled or not split.train else [])
    if cfg.data.max_images:
        records = records[: cfg.data.max_images]
    global_batch = cfg.optim.batch_size * dist_info.world
    iters_per_pass = cfg.train.iters_per_epoch or len(records) // global_batch
    if iters_per_pass < 1:
        raise ValueError(f"{len(records)} images are fewer than one global batch of {global_batch}")
    iters_per_epoch = cfg.optim.epoch_length or iters_per_pass
    c = cfg.crops
    grid = (c.global_size // cfg.model.patch_size,) * 2
    geometry = (c.global_size, c.local_size, c.n_local, c.global_scale, c.local_scale)
    augment_on = choose_augment_on(cfg.data.augment_on, device.type)
    if augment_on == "device":  # the loader only decodes; crops are cut per batch on the device
        transform, batch_crops = device_augmentation(c)
        batch_crops = batch_crops.to(device)
    else:
        transform, batch_crops = MultiCrop(*geometry, c.blur_p, c.blur_sigma), None
    sampler = EpochSampler(len(records), global_batch, iters_per_pass, cfg.train.seed, dist_info.rank, dist_info.world)
    loader = DataLoader(
        MultiCropDataset(records, transform, cfg.train.seed),
        batch_size=cfg.optim.batch_size,
        sampler=sampler,
        collate_fn=MultiCropCollate(grid, cfg.masks, cfg.train.seed, global_batch),
        **loader_options(cfg.data.num_workers, device.type),
    )
    return TrainData(
        split,
        data_root,
        records,
        global_batch,
        iters_per_epoch,
        iters_per_pass,
        loader,
        sampler,
        batch_crops,
        augment_on,
    )


@dataclass
class TrainParts:
    student: SSLModel
    teacher: SSLModel
    model: nn.Module  # the student as the step calls it: wrapped by DDP under torchrun
    objective: DINOv2Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sharded: bool


def build_parts(cfg: Config, device: torch.device, precision: str, resume: bool, world: int) -> TrainParts:
    """Student, EMA teacher, objective, AdamW and loss scaler; DDP or FSDP when launched so.

    On resume the checkpoint supplies every weight: the bare architecture is built (no download).
    """
    student = (build_architecture if resume else build_ssl_model)(cfg.model, cfg.crops.global_size).to(device)
    student.backbone.grad_checkpointing = cfg.train.grad_checkpointing
    teacher = build_teacher(student)
    sharded = cfg.train.fsdp
    if sharded:
        if not dist.is_initialized():
            raise ValueError("train.fsdp needs a distributed launch: torchrun --nproc_per_node=N -m dinokit pretrain …")
        shard(student)
        shard(teacher)
    objective = DINOv2Objective(cfg.loss, cfg.model.head_prototypes).to(device)
    o = cfg.optim
    optimizer = build_optimizer(student, device, o.layerwise_decay, o.patch_embed_lr_mult, sharded)
    model: nn.Module = student
    if world > 1 and not sharded:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    # per block, static shapes; eager after one warning where it fails
    compiled = cfg.train.compile and compile_blocks(student.backbone)
    if compiled:
        compile_blocks(teacher.backbone)
    else:  # a compiled block leaves what to keep for the backward to the compiler
        set_lean_branches(student.backbone, lean_branches_pay(device.type))
    return TrainParts(student, teacher, model, objective, optimizer, grad_scaler(precision, device), sharded)


def restore(parts: TrainParts, ckpt_path: Path) -> int:
    """Load every state of the run from its checkpoint; returns the iteration to continue from."""
    state = runs.load_checkpoint(ckpt_path)
    load_full_state(parts.student, state["student"], parts.sharded, parts.optimizer, state["optimizer"])
    load_full_state(parts.teacher, state["teacher"], parts.sharded)
    parts.objective.load_state_dict(state["objective"])
    parts.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["iteration"])


def write_crops_example(cfg: Config, records: list, path: Path) -> None:
    """The recipe's crops of the first readable pre-training image (seeded), for the report's figure."""
    c = cfg.crops
    crops = MultiCrop(c.global_size, c.local_size, c.n_local, c.global_scale, c.local_scale, c.blur_p, c.blur_sigma)
    for record in records[:10]:
        try:
            image = load_rgb(record.source)
        except BadImage:
            continue
        with torch.random.fork_rng(devices=[]):  # the run's own random stream stays untouched
            torch.manual_seed(cfg.train.seed)
            views = crops(image)
        local = torch.stack(views["local"]) if views["local"] else torch.empty(0, 3, c.local_size, c.local_size)
        runs.save_atomic({"global": torch.stack(views["global"]), "local": local, "name": record.name}, path)
        return

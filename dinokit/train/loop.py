"""``dinokit pretrain``: the DINOv2 training loop.

Read :func:`train_step` first: teacher and student forwards, the loss terms, backward, optimizer
step and EMA, in one screen. :func:`pretrain` is the set-up around it: data and split, model,
optimizer, schedules, resume, checkpoints, logging, signals and the kNN monitor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinokit import paths
from dinokit.config import Config
from dinokit.data.crops import MultiCrop
from dinokit.data.har import load_dataset
from dinokit.data.images import ProblemLog
from dinokit.data.loader import EpochSampler, MultiCropDataset, collate_multicrop, seed_of
from dinokit.data.split import Split, make_split
from dinokit.data.synth import ensure_embedded
from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_accuracy
from dinokit.losses.objective import DINOv2Objective
from dinokit.models.ssl import SSLModel, build_architecture, build_ssl_model
from dinokit.train.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from dinokit.train.dist import DistInfo, any_rank, barrier, init_distributed
from dinokit.train.fsdp import full_model_state, full_optimizer_state, load_full_state, shard
from dinokit.train.param_groups import apply_schedules, build_param_groups
from dinokit.train.precision import autocast, grad_scaler, resolve_precision
from dinokit.train.schedules import Schedules, build_schedules
from dinokit.train.teacher import build_teacher, ema_update

log = logging.getLogger("dinokit.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "finished" | "interrupted" | "diverged"
    iteration: int
    metrics: dict = field(default_factory=dict)


def train_step(
    student: nn.Module,
    teacher: SSLModel,
    objective: DINOv2Objective,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict,
    sched: dict[str, float],
    precision: str,
    device: torch.device,
    clip_grad: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One DINOv2 step. Returns the total loss (for the NaN check) and the logged terms."""
    global_crops = batch["global"].to(device, non_blocking=True)
    local_crops = batch["local"].to(device, non_blocking=True) if "local" in batch else None
    masks = batch["masks"].to(device, non_blocking=True)
    apply_schedules(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])

    with autocast(precision, device):
        with torch.no_grad():  # the teacher sees only the unmasked global crops
            teacher_out = teacher(global_crops, masks=masks, mask_input=False)
        student_out = student(global_crops, local_crops, masks)  # masked globals + locals
        loss, logs = objective(student_out, teacher_out, masks, sched["teacher_temp"])

    # every process must skip the backward together, or the others hang
    if any_rank(not torch.isfinite(loss.detach()), device):
        return loss.detach() * float("nan"), logs
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        norm = nn.utils.clip_grad_norm_(student.parameters(), clip_grad)
        logs["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    scaler.step(optimizer)
    scaler.update()
    ema_update(teacher, student, sched["momentum"])
    return loss, logs


def resolve_data_root(cfg: Config) -> Path:
    """``data.root``, else ``DINOKIT_DATA``, else the embedded dataset (generated on first use)."""
    if cfg.data.root:
        return Path(cfg.data.root)
    har = paths.har_root()
    if har is not None:
        return har
    n, size = cfg.data.synth_per_class, cfg.data.synth_size
    return ensure_embedded(paths.embedded_dataset_dir(n, size), n, size)


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    logger = logging.getLogger("dinokit")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if getattr(handler, "_dinokit_run", False):
            logger.removeHandler(handler)
            handler.close()
    if is_main:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._dinokit_run = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def prepare_split(cfg: Config, progress: bool = True) -> Split:
    data = load_dataset(resolve_data_root(cfg))
    data.problems.warn_once(f"reading {data.root}")
    return make_split(data, cfg.data.val_fraction, cfg.data.split_seed, progress=progress)


def knn_monitor(backbone: nn.Module, split: Split, cfg: Config, device: torch.device) -> dict[str, float]:
    """kNN top-1/top-5 of ``backbone``'s CLS features, train split -> held-out split."""
    kw = dict(size=cfg.crops.eval_size, device=device, progress=False)
    train = extract_features(backbone, split.train, **kw)
    val = extract_features(backbone, split.val, **kw)
    return knn_accuracy(
        train["features"]["cls"], train["labels"], val["features"]["cls"], val["labels"],
        len(split.classes), cfg.train.knn_k, cfg.train.knn_temperature,
    )  # fmt: skip


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to save and stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received signal %s: saving a checkpoint and stopping after this step", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pretrain(cfg: Config, out_dir: str | Path | None = None, resume: bool = False, on_step=None) -> RunResult:
    """Train (or resume) a run in ``out_dir`` (default ``runs/<preset>``).

    ``on_step(iteration, logs)`` is called after every step (tests use it to send signals).
    """
    dist_info: DistInfo = init_distributed()
    device = dist_info.device
    run_dir = Path(out_dir) if out_dir else paths.runs_dir() / cfg.preset
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}; start the run without --resume")
        saved = Config.load(run_dir / "config.json")
        saved.data.num_workers = cfg.data.num_workers
        cfg = saved
    elif ckpt_path.is_file():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or --out to start a new one"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir, dist_info.is_main)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)

    # ---- data: the fixed split; held-out images never reach pre-training
    split = prepare_split(cfg, progress=dist_info.is_main)
    records = split.train + (split.unlabeled if cfg.data.use_unlabeled else [])
    if cfg.data.max_images:
        records = records[: cfg.data.max_images]
    global_batch = cfg.optim.batch_size * dist_info.world
    iters_per_epoch = cfg.train.iters_per_epoch or len(records) // global_batch
    if iters_per_epoch < 1:
        raise ValueError(f"{len(records)} images are fewer than one global batch of {global_batch}")
    total_iters = cfg.train.max_iters or cfg.optim.epochs * iters_per_epoch
    patch = cfg.model.patch_size
    grid = (cfg.crops.global_size // patch, cfg.crops.global_size // patch)
    transform = MultiCrop(
        cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local, cfg.crops.global_scale, cfg.crops.local_scale
    )
    dataset = MultiCropDataset(records, transform, grid, cfg.masks, cfg.train.seed)
    sampler = EpochSampler(len(records), global_batch, iters_per_epoch, cfg.train.seed, dist_info.rank, dist_info.world)
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_multicrop,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    # ---- model, teacher, objective, optimizer, schedules
    # On resume the checkpoint supplies every weight: build the bare architecture (no download).
    student = (build_architecture if resume else build_ssl_model)(cfg.model, cfg.crops.global_size).to(device)
    teacher = build_teacher(student)
    sharded = cfg.train.fsdp
    if sharded:
        if not dist.is_initialized():
            raise ValueError("train.fsdp needs a distributed launch: torchrun --nproc_per_node=N -m dinokit pretrain …")
        shard(student)
        shard(teacher)
    objective = DINOv2Objective(cfg.loss, cfg.model.head_prototypes).to(device)
    depth = len(student.backbone.blocks)
    groups = build_param_groups(student, depth, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], betas=(0.9, 0.999))
    schedules: Schedules = build_schedules(cfg, iters_per_epoch, total_iters, global_batch)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = grad_scaler(precision, device)

    start_iter = 0
    if resume:
        state = load_checkpoint(ckpt_path)
        load_full_state(student, state["student"], sharded, optimizer, state["optimizer"])
        load_full_state(teacher, state["teacher"], sharded)
        objective.load_state_dict(state["objective"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_iter = int(state["iteration"])
        log.info("resumed %s at iteration %d of %d", run_dir, start_iter, total_iters)

    model: nn.Module = student
    if dist_info.world > 1 and not sharded:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        model = torch.compile(model)

    if dist_info.is_main:
        cfg.save(run_dir / "config.json")
        split.write_manifest(run_dir / "split.csv")
        (run_dir / "run_info.json").write_text(
            json.dumps(
                {
                    "split_sha256": split.sha256,
                    "classes": split.classes,
                    "n_pretrain_images": len(records),
                    "iters_per_epoch": iters_per_epoch,
                    "total_iters": total_iters,
                    "global_batch": global_batch,
                    "precision": precision,
                    "device": str(device),
                    "world_size": dist_info.world,
                    "torch": torch.__version__,
                },
                indent=2,
            )
        )
    metrics_path = run_dir / "metrics.jsonl"
    if dist_info.is_main:
        _truncate_metrics(metrics_path, start_iter)
    log.info(
        "pre-training %s: %d images, %d iterations (%d/epoch), global batch %d, %s on %s",
        cfg.preset, len(records), total_iters, iters_per_epoch, global_batch, precision, device,
    )  # fmt: skip

    def teacher_backbone_state() -> dict[str, torch.Tensor]:
        """Full teacher backbone weights (a collective under FSDP: every rank calls it)."""
        full = full_model_state(teacher, sharded)
        return {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}

    def save(iteration: int) -> None:
        student_state = full_model_state(student, sharded)  # collective under FSDP
        teacher_state = full_model_state(teacher, sharded)
        optimizer_state = full_optimizer_state(student, optimizer, sharded)
        if not dist_info.is_main:
            return
        save_atomic(
            {
                "student": student_state,
                "teacher": teacher_state,
                "objective": objective.state_dict(),
                "optimizer": optimizer_state,
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "iteration": iteration,
                "epoch": iteration // iters_per_epoch,
                "config": cfg.to_dict(),
            },
            ckpt_path,
        )

    problems = ProblemLog()
    status, it = "finished", start_iter
    last_logs: dict[str, float] = {}
    bar = tqdm(total=total_iters, initial=start_iter, desc="pre-training", disable=not dist_info.is_main)
    window_start, window_images = time.perf_counter(), 0
    metrics_cm = metrics_path.open("a") if dist_info.is_main else contextlib.nullcontext()
    with _StopFlag() as stop, metrics_cm as metrics_file:
        while it < total_iters and status == "finished":
            epoch = it // iters_per_epoch
            sampler.set_position(epoch, it % iters_per_epoch)
            dataset.set_epoch(epoch)
            for batch in loader:
                for name, reason in batch["bad"]:
                    problems.add(name, reason)
                if batch["size"] == 0:
                    it += 1
                    continue
                torch.manual_seed(seed_of(cfg.train.seed, it, dist_info.rank))  # drop path, per step
                loss, logs = train_step(
                    model, teacher, objective, optimizer, scaler, batch,
                    schedules.at(it), precision, device, cfg.optim.clip_grad,
                )  # fmt: skip
                if not torch.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {float(loss)} at iteration {it}; the last good checkpoint "
                        f"({ckpt_path}) is kept. Lower optim.base_lr, raise optim.warmup_epochs, "
                        "or train with train.precision=fp32."
                    )
                it += 1
                window_images += batch["size"] * dist_info.world
                logs.update(schedules.at(it - 1))
                logs.update({"iteration": it, "epoch": (it - 1) // iters_per_epoch})
                if it % cfg.train.log_every == 0 or it == total_iters:
                    elapsed = time.perf_counter() - window_start
                    logs["images_per_s"] = window_images / max(elapsed, 1e-9)
                    window_start, window_images = time.perf_counter(), 0
                    if dist_info.is_main:
                        metrics_file.write(json.dumps(logs) + "\n")
                        metrics_file.flush()
                    bar.set_postfix(
                        loss=f"{logs['loss_dino']:.3f}", lr=f"{logs['lr']:.1e}", m=f"{logs['momentum']:.4f}",
                        img_s=f"{logs['images_per_s']:.0f}",
                    )  # fmt: skip
                bar.update()
                last_logs = logs
                if on_step is not None:
                    on_step(it, logs)
                end_of_epoch = it % iters_per_epoch == 0
                epoch_done = it // iters_per_epoch
                if end_of_epoch and (epoch_done % cfg.train.knn_every_epochs == 0 or it == total_iters):
                    backbone_state = teacher_backbone_state() if sharded else teacher.backbone.state_dict()
                    if dist_info.is_main:
                        eval_backbone = teacher.backbone
                        if sharded:  # a plain, unsharded copy for the single-process kNN
                            eval_backbone = build_architecture(cfg.model, cfg.crops.global_size).backbone.to(device)
                            eval_backbone.load_state_dict(backbone_state)
                        acc = knn_monitor(eval_backbone, split, cfg, device)
                        record = {
                            "iteration": it,
                            "epoch": epoch_done,
                            "knn_top1": acc["top1"],
                            "knn_top5": acc["top5"],
                        }
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        save_atomic(backbone_state, run_dir / "snapshots" / f"teacher_{it:07d}.pt")
                        log.info("epoch %d: kNN top-1 %.2f%%, top-5 %.2f%%", epoch_done, acc["top1"], acc["top5"])
                    barrier()
                stopping = any_rank(stop.requested, device)
                if it % cfg.train.checkpoint_every == 0 and it < total_iters and not stopping:
                    save(it)
                if stopping:
                    status = "interrupted"
                    break
                if it >= total_iters:
                    break
    bar.close()
    problems.warn_once("pre-training")
    save(it)
    final_backbone = teacher_backbone_state()
    if dist_info.is_main:
        if status == "finished":
            save_atomic(final_backbone, run_dir / "teacher_backbone.pt")
        log.info("%s at iteration %d; run directory %s", status, it, run_dir)
    barrier()
    return RunResult(run_dir, status, it, last_logs)


def _truncate_metrics(path: Path, start_iter: int) -> None:
    """On resume, drop log lines from iterations after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= start_iter:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in keep))

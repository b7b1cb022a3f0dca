"""``dinokit pretrain``: the set-up around :func:`dinokit.train.step.train_step`.

Data and split, model, optimizer, schedules, precision and attention kernel for the device,
resume, checkpoints, logging, signals, the kNN monitor, and clear messages when a run diverges
or runs out of memory. Read ``train_step`` first; this file is the plumbing around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinokit import runs
from dinokit.config import Config
from dinokit.data.batch_crops import BatchMultiCrop, DecodeToCanvas, canvas_size, choose_augment_on
from dinokit.data.crops import MultiCrop
from dinokit.data.images import ProblemLog
from dinokit.data.loader import EpochSampler, MultiCropCollate, MultiCropDataset, seed_of
from dinokit.data.source import data_tag, prepare_split, resolve_data_root
from dinokit.data.split import Split
from dinokit.device import device_kind, device_name, peak_memory_mb, resolve_device
from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_accuracy
from dinokit.losses.objective import DINOv2Objective
from dinokit.models.kernels import describe_attention, flash_attn_problem
from dinokit.models.ssl import build_architecture, build_ssl_model
from dinokit.precision import DTYPES, choose_precision, grad_scaler, precision_warning
from dinokit.train.budget import calibrate
from dinokit.train.checkpoint import rng_state, set_rng_state
from dinokit.train.dist import DistInfo, any_rank, barrier, init_distributed
from dinokit.train.fsdp import full_model_state, full_optimizer_state, load_full_state, shard
from dinokit.train.param_groups import build_param_groups
from dinokit.train.schedules import Schedules, build_schedules
from dinokit.train.step import train_step
from dinokit.train.teacher import build_teacher

log = logging.getLogger("dinokit.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the knobs, the last checkpoint is kept."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "finished" | "interrupted" | "diverged"
    iteration: int
    metrics: dict = field(default_factory=dict)


def knn_monitor(
    backbone: nn.Module, split: Split, cfg: Config, device: torch.device | str = "cpu", precision: str = "fp32"
) -> dict[str, float]:
    """kNN top-1/top-5 of ``backbone``'s CLS features, train split -> held-out split."""
    kw = dict(size=cfg.crops.eval_size, device=device, precision=precision, progress=False)
    train = extract_features(backbone, split.train, **kw)
    val = extract_features(backbone, split.val, **kw)
    return knn_accuracy(
        train["features"]["cls"], train["labels"], val["features"]["cls"], val["labels"],
        len(split.classes), cfg.train.knn_k, cfg.train.knn_temperature,
    )  # fmt: skip


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    logger = logging.getLogger("dinokit")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if getattr(handler, "_dinokit_run", False):
            logger.removeHandler(handler)
            handler.close()
    if is_main:
        handler = logging.FileHandler(run_dir / runs.LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._dinokit_run = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


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


# Settings that change how a run computes, not what it learns: a resumed run may change them
# (e.g. turn on activation checkpointing after running out of memory). Everything else is the run's.
RESUMABLE_KEYS = (
    "data.num_workers", "data.augment_on", "train.grad_checkpointing", "model.attention", "train.compile",
    "train.num_threads",
)  # fmt: skip


def resume_config(run_dir: Path, current: Config) -> Config:
    """The run's own saved config, with the runtime settings of ``current``."""
    saved = Config.load(run_dir / runs.CONFIG)
    for key in RESUMABLE_KEYS:
        section, name = key.split(".")
        setattr(getattr(saved, section), name, getattr(getattr(current, section), name))
    return saved


def divergence_message(logs: dict, objective: DINOv2Objective, iteration: int, ckpt_path: Path) -> str:
    """Name what went non-finite first (a centre, or a loss term) and the advice that fits it."""
    keep = f"the last good checkpoint ({ckpt_path}) is kept"
    for name, centre in (("DINO centre", objective.dino_center), ("iBOT centre", objective.ibot_center)):
        if not torch.isfinite(centre.center).all():
            return (
                f"the {name} became non-finite before iteration {iteration}; {keep}. A centre goes "
                "non-finite when the teacher's logits do: try train.precision=fp32 to rule out overflow."
            )
    labels = {"loss_dino": "DINO", "loss_ibot": "iBOT", "loss_koleo": "KoLeo"}
    bad = [labels[k] for k in labels if k in logs and not math.isfinite(logs[k])]
    what = " and ".join(bad) + " loss" if bad else "total loss"
    advice = "Lower optim.base_lr, raise optim.warmup_epochs, or train with train.precision=fp32."
    if bad == ["KoLeo"]:
        advice = "KoLeo diverges when two features coincide: lower loss.koleo_weight or set it to 0."
    return f"the {what} became non-finite at iteration {iteration}; {keep}. {advice}"


def oom_message(cfg: Config, iteration: int, ckpt_path: Path) -> str:
    knobs = [
        f"optim.batch_size={max(1, cfg.optim.batch_size // 2)} (now {cfg.optim.batch_size})",
        "train.grad_checkpointing=true" if not cfg.train.grad_checkpointing else None,
        "model.attention=sdpa" if cfg.model.attention == "naive" else None,
        "train.precision=fp16 or bf16" if cfg.train.precision == "fp32" else None,
    ]
    return (
        f"out of GPU memory at iteration {iteration}. Try " + ", ".join(k for k in knobs if k) + ". "
        f"The last checkpoint ({ckpt_path}) is intact: `dinokit pretrain --out {ckpt_path.parent} --resume "
        "--set train.grad_checkpointing=true` continues this run with less memory (its batch size is fixed; "
        "a smaller batch needs a new run)."
    )


def pretrain(
    cfg: Config,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_step=None,
    device: str | torch.device = "auto",
) -> RunResult:
    """Train (or resume) a run in ``out_dir`` (default ``runs/<preset>-<dataset>``).

    ``device``: auto (CUDA when present), cpu, cuda or cuda:N. ``on_step(iteration, logs)`` is
    called after every step (tests use it to send signals).
    """
    device = resolve_device(device)
    dist_info: DistInfo = init_distributed(device)
    run_dir = Path(out_dir) if out_dir else runs.default_run_dir(cfg)
    ckpt_path = run_dir / runs.CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}; start the run without --resume")
        cfg = resume_config(run_dir, cfg)
    elif ckpt_path.is_file():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or --out to start a new one"
        )
    kind = device_kind(device)
    precision = choose_precision(cfg.train.precision, kind)
    if cfg.model.attention == "flash-attn" and (problem := flash_attn_problem(kind)):
        raise ValueError(problem)
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir, dist_info.is_main)
    if warning := precision_warning(precision, kind):
        log.warning(warning)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)

    # ---- data: the fixed split; held-out images never reach pre-training
    data_root = resolve_data_root(cfg)
    split = prepare_split(cfg, progress=dist_info.is_main)
    if resume:
        runs.check_data(run_dir, split.sha256, data_root)
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
    c = cfg.crops
    crop_args = (c.global_size, c.local_size, c.n_local, c.global_scale, c.local_scale, c.blur_p)
    augment_on = choose_augment_on(cfg.data.augment_on, device.type)
    if augment_on == "device":  # the loader only decodes; crops are cut per batch on the device
        transform, batch_crops = DecodeToCanvas(canvas_size(c.global_size)), BatchMultiCrop(*crop_args).to(device)
    else:
        transform, batch_crops = MultiCrop(*crop_args), None
    dataset = MultiCropDataset(records, transform, cfg.train.seed)
    sampler = EpochSampler(len(records), global_batch, iters_per_epoch, cfg.train.seed, dist_info.rank, dist_info.world)
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=MultiCropCollate(grid, cfg.masks, cfg.train.seed, global_batch),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    # ---- model, teacher, objective, optimizer, schedules
    # On resume the checkpoint supplies every weight: build the bare architecture (no download).
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
    depth = len(student.backbone.blocks)
    groups = build_param_groups(student, depth, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], betas=(0.9, 0.999))
    scaler = grad_scaler(precision, device)

    start_iter = 0
    if resume:
        state = runs.load_checkpoint(ckpt_path)
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

    def run_step(batch: dict, it: int, sched: dict[str, float]) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(seed_of(cfg.train.seed, it, dist_info.rank))  # crops on the device, drop path
        if batch_crops is not None:
            batch.update(batch_crops(batch["canvas"].to(device, non_blocking=True), batch["hw"]))
        return train_step(
            model, teacher, objective, optimizer, scaler, batch, sched, precision, device, cfg.optim.clip_grad
        )

    def teacher_backbone_state() -> dict[str, torch.Tensor]:
        """Full teacher backbone weights (a collective under FSDP: every rank calls it)."""
        full = full_model_state(teacher, sharded)
        return {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}

    def save(iteration: int, path: Path = ckpt_path) -> None:
        student_state = full_model_state(student, sharded)  # collective under FSDP
        teacher_state = full_model_state(teacher, sharded)
        optimizer_state = full_optimizer_state(student, optimizer, sharded)
        if not dist_info.is_main:
            return
        runs.save_atomic(
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
            path,
        )

    budget = None
    if cfg.train.time_budget_min > 0 and sharded:
        raise ValueError("train.time_budget_min cannot time an FSDP run; set optim.epochs instead")
    if cfg.train.time_budget_min > 0 and not resume:
        budget = _fit_time_budget(cfg, run_step, save, loader, sampler, dataset, objective, optimizer, scaler,
                                  teacher, split, device, precision, iters_per_epoch, run_dir)  # fmt: skip
        total_iters = budget.iterations if not cfg.train.max_iters else min(cfg.train.max_iters, budget.iterations)
        log.info(budget.why())
    schedules: Schedules = build_schedules(cfg, iters_per_epoch, total_iters, global_batch)

    head_dim = student.backbone.embed_dim // student.backbone.num_heads
    kernel = describe_attention(cfg.model.attention, device, DTYPES[precision], head_dim)
    if dist_info.is_main:
        cfg.save(run_dir / runs.CONFIG)
        split.write_manifest(run_dir / runs.SPLIT)
        info = {
            "preset": cfg.preset,
            "split_sha256": split.sha256,
            "data_root": str(data_root),
            "dataset": data_tag(cfg),
            "classes": split.classes,
            "n_pretrain_images": len(records),
            "iters_per_epoch": iters_per_epoch,
            "total_iters": total_iters,
            "global_batch": global_batch,
            "precision": precision,
            "attention": cfg.model.attention,
            "attention_kernel": kernel,
            "grad_checkpointing": cfg.train.grad_checkpointing,
            "augment_on": augment_on,
            "num_workers": cfg.data.num_workers,
            "device": str(device),
            "device_name": device_name(device),
            "world_size": dist_info.world,
            "torch": torch.__version__,
        }
        if budget is not None:
            info["time_budget"] = budget.to_dict()
        if resume:  # what the run measured before this resume stays
            previous = runs.run_info(run_dir)
            info.update({k: previous[k] for k in ("time_budget", "train_seconds") if k in previous})
        (run_dir / runs.RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    metrics_path = run_dir / runs.METRICS
    if dist_info.is_main:
        _truncate_metrics(metrics_path, start_iter)
        if budget is not None and budget.knn is not None:  # the untrained teacher, measured while timing
            with metrics_path.open("a") as handle:
                handle.write(json.dumps({"iteration": 0, "epoch": 0, **budget.knn}) + "\n")
    log.info(
        "pre-training %s: %d images, %d iterations (%d/epoch), global batch %d, %s on %s (%s), attention: %s, "
        "augmentation on the %s (%d loader workers)",
        cfg.preset, len(records), total_iters, iters_per_epoch, global_batch, precision, device,
        device_name(device), kernel, augment_on, cfg.data.num_workers,
    )  # fmt: skip

    problems = ProblemLog()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    status, it = "finished", start_iter
    last_logs: dict[str, float] = {}
    bar = tqdm(total=total_iters, initial=start_iter, desc="pre-training", disable=not dist_info.is_main)
    loop_start = time.perf_counter()
    window = {"start": time.perf_counter(), "images": 0, "wait": 0.0, "skipped": 0}
    metrics_cm = metrics_path.open("a") if dist_info.is_main else contextlib.nullcontext()
    with _StopFlag() as stop, metrics_cm as metrics_file:
        while it < total_iters and status == "finished":
            epoch = it // iters_per_epoch
            sampler.set_position(epoch, it % iters_per_epoch)
            dataset.set_epoch(epoch)
            fetch_start = time.perf_counter()
            for batch in loader:
                window["wait"] += time.perf_counter() - fetch_start
                for name, reason in batch["bad"]:
                    problems.add(name, reason)
                if batch["size"] == 0:
                    it += 1
                    fetch_start = time.perf_counter()
                    continue
                try:
                    loss, logs = run_step(batch, it, schedules.at(it))
                except torch.OutOfMemoryError:
                    bar.close()
                    raise TrainingOutOfMemory(oom_message(cfg, it, ckpt_path)) from None
                if not torch.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(divergence_message(logs, objective, it, ckpt_path))
                it += 1
                window["images"] += batch["size"] * dist_info.world
                window["skipped"] += int(logs.pop("amp_skipped", 0))
                logs.update(schedules.at(it - 1))
                logs.update({"iteration": it, "epoch": (it - 1) // iters_per_epoch})
                if it % cfg.train.log_every == 0 or it == total_iters:
                    elapsed = max(time.perf_counter() - window["start"], 1e-9)
                    logs["images_per_s"] = window["images"] / elapsed
                    logs["data_wait_share"] = window["wait"] / elapsed
                    logs["peak_mem_mb"] = peak_memory_mb(device)
                    if scaler.is_enabled():
                        logs["amp_skipped_steps"] = window["skipped"]  # fp16 overflows in this window
                    window = {"start": time.perf_counter(), "images": 0, "wait": 0.0, "skipped": 0}
                    if dist_info.is_main:
                        metrics_file.write(json.dumps(logs) + "\n")
                        metrics_file.flush()
                    bar.set_postfix(
                        loss=f"{logs['loss_dino']:.3f}", lr=f"{logs['lr']:.1e}", m=f"{logs['momentum']:.4f}",
                        img_s=f"{logs['images_per_s']:.0f}", wait=f"{logs['data_wait_share']:.0%}",
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
                        acc = knn_monitor(eval_backbone, split, cfg, device, precision)
                        record = {
                            "iteration": it,
                            "epoch": epoch_done,
                            "knn_top1": acc["top1"],
                            "knn_top5": acc["top5"],
                        }
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        runs.save_atomic(backbone_state, run_dir / runs.SNAPSHOTS / f"teacher_{it:07d}.pt")
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
                fetch_start = time.perf_counter()
    bar.close()
    problems.warn_once("pre-training")
    save(it)
    final_backbone = teacher_backbone_state()
    if dist_info.is_main:
        if status == "finished":
            runs.save_atomic(final_backbone, run_dir / runs.TEACHER)
        log.info("%s at iteration %d; run directory %s", status, it, run_dir)
        # wall time of the training loop (kNN checks and saves included), summed over resumes
        info = runs.run_info(run_dir)
        info["train_seconds"] = info.get("train_seconds", 0.0) + time.perf_counter() - loop_start
        (run_dir / runs.RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    barrier()
    return RunResult(run_dir, status, it, last_logs)


def _fit_time_budget(
    cfg, run_step, save, loader, sampler, dataset, objective, optimizer, scaler, teacher, split, device, precision,
    iters_per_epoch, run_dir,
):  # fmt: skip
    """Time real steps (at lr 0, so no weight moves) and one kNN check, choose the epochs that fit,
    then put back what the measurement touched: optimizer moments, centres, loss scale."""
    saved = {"objective": objective.state_dict(), "scaler": scaler.state_dict()}
    saved["objective"] = {k: v.clone() for k, v in saved["objective"].items()}
    o, lo = cfg.optim, cfg.loss
    frozen = {"lr": 0.0, "wd": o.weight_decay, "momentum": o.momentum_teacher, "teacher_temp": lo.warmup_teacher_temp,
              "last_layer_lr": 0.0}  # fmt: skip
    sampler.set_position(0, 0)
    dataset.set_epoch(0)
    knn: dict = {}

    probe = run_dir / ".budget-probe.pt"

    def knn_check() -> None:  # as in training: the check and its snapshot
        acc = knn_monitor(teacher.backbone, split, cfg, device, precision)
        knn.update({"knn_top1": acc["top1"], "knn_top5": acc["top5"]})
        runs.save_atomic(teacher.backbone.state_dict(), probe)

    def save_check() -> None:
        save(0, probe)
        probe.unlink(missing_ok=True)

    def batches():  # the first batches of epoch 0, again if an epoch is shorter than the measurement
        while True:
            yield from (b for b in loader if b["size"])

    choice = calibrate(
        cfg.train.time_budget_min, batches(), lambda b, i: run_step(b, i, frozen), knn_check, save_check,
        iters_per_epoch, cfg.train.knn_every_epochs, cfg.train.checkpoint_every, max_epochs=cfg.optim.epochs,
    )  # fmt: skip
    optimizer.state.clear()
    objective.load_state_dict(saved["objective"])
    scaler.load_state_dict(saved["scaler"])
    if dist.is_initialized():  # every process must train the same schedule: the slowest decides
        epochs = torch.tensor(choice.epochs, device=device)
        dist.all_reduce(epochs, op=dist.ReduceOp.MIN)
        choice.epochs = int(epochs.item())
    choice.knn = knn
    cfg.optim.epochs = choice.epochs  # written to config.json: resume and reruns follow the same schedule
    cfg.train.time_budget_min = 0.0
    return choice


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

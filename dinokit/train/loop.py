"""``dinokit pretrain``: the set-up around :func:`dinokit.train.step.train_step`, and its loop.

:func:`pretrain` is a list of calls: open the run, build data and parts
(:mod:`dinokit.train.setup`), restore, fit the time budget, write the run record, then
:func:`train_loop`, which reads like nanoGPT's: step, metrics, kNN when due, stop check, save
when due. The services it calls live in :mod:`dinokit.train.services`. Read ``train_step`` first.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dinokit import runs
from dinokit.config import Config
from dinokit.data.images import ProblemLog
from dinokit.data.loader import seed_of
from dinokit.data.source import data_tag
from dinokit.data.split import Split
from dinokit.device import device_kind, device_name, resolve_device, synchronize
from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_accuracy
from dinokit.models.compile import eager_blocks
from dinokit.models.kernels import describe_attention, flash_attn_problem
from dinokit.models.ssl import build_architecture
from dinokit.precision import DTYPES, choose_precision, precision_warning
from dinokit.train.budget import BudgetChoice, calibrate
from dinokit.train.checkpoint import rng_state
from dinokit.train.dist import DistInfo, any_rank, barrier, init_distributed
from dinokit.train.fsdp import full_model_state, full_optimizer_state
from dinokit.train.schedules import Schedules, build_schedules
from dinokit.train.services import (
    CENTRES,
    Checkpointer,
    MetricsLog,
    StepHealth,
    StopFlag,
    setup_logging,
    summary_writer_class,
    truncate_metrics,
)  # fmt: skip
from dinokit.train.setup import TrainData, TrainParts, build_data, build_parts, restore, write_crops_example
from dinokit.train.step import train_step

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
    """kNN top-1/top-5 of ``backbone``'s CLS features, train split -> held-out split; ``{}`` without labels."""
    if not split.val or len(split.classes) < 2:
        return {}
    kw = dict(size=cfg.crops.eval_size, device=device, precision=precision, progress=False)
    with eager_blocks(backbone):  # train.compile: evaluation's shapes would each be compiled (eager_blocks)
        train = extract_features(backbone, split.train, **kw)
        val = extract_features(backbone, split.val, **kw)
    return knn_accuracy(
        train["features"]["cls"], train["labels"], val["features"]["cls"], val["labels"],
        len(split.classes), cfg.train.knn_k, cfg.train.knn_temperature,
    )  # fmt: skip


# Settings that change how a run computes, not what it learns: a resumed run may change them
# (e.g. turn on activation checkpointing after running out of memory). Everything else is the run's.
RESUMABLE_KEYS = (
    "data.num_workers", "data.augment_on", "train.grad_checkpointing", "model.attention", "train.compile",
    "train.num_threads", "train.tensorboard",
)  # fmt: skip


def resume_config(run_dir: Path, current: Config) -> Config:
    """The run's own saved config, with the runtime settings of ``current``."""
    saved = Config.load(run_dir / runs.CONFIG)
    for key in RESUMABLE_KEYS:
        section, name = key.split(".")
        setattr(getattr(saved, section), name, getattr(getattr(current, section), name))
    return saved


def divergence_message(logs: dict, iteration: int, ckpt_path: Path) -> str:
    """Name what went non-finite first (a centre, a loss term, or the gradients) and the advice that
    fits it. ``logs``: what :meth:`StepHealth.first_bad` recorded of that step (later steps, run
    before the check, have spread the NaN everywhere)."""
    keep = f"the last good checkpoint ({ckpt_path}) is kept"
    if iteration < 0:
        return f"another process's loss or gradients became non-finite; {keep}. Lower optim.base_lr or use fp32."
    for name in CENTRES:
        if logs.get(name, 1.0) < 1.0:
            return (
                f"the {name} became non-finite at iteration {iteration}; {keep}. A centre goes "
                "non-finite when the teacher's logits do: try train.precision=fp32 to rule out overflow."
            )
    labels = {"loss_dino": "DINO", "loss_ibot": "iBOT", "loss_koleo": "KoLeo"}
    bad = [labels[k] for k in labels if k in logs and not math.isfinite(logs[k])]
    total_bad = not math.isfinite(logs.get("loss_total", math.nan))
    what = " and ".join(bad) + " loss" if bad else ("total loss" if total_bad else "gradients (with a finite loss)")
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
    called after every step (tests use it to send signals); ``logs`` values are device tensors.
    """
    device = resolve_device(device)
    if cfg.train.tensorboard:
        summary_writer_class()  # before any work: a missing optional package is named now
    dist_info = init_distributed(device)
    cfg, run_dir, precision = _open_run(cfg, out_dir, resume, device, dist_info)
    data = build_data(cfg, dist_info, device)
    if resume:
        runs.check_data(run_dir, data.split.sha256, data.data_root)
    parts = build_parts(cfg, device, precision, resume, dist_info.world)
    start_iter = restore(parts, run_dir / runs.CHECKPOINT) if resume else 0
    if resume:
        log.info("resumed %s at iteration %d", run_dir, start_iter)
    checkpointer = Checkpointer(run_dir / runs.CHECKPOINT, cfg.train.checkpoint_every,
                                lambda it: _state(cfg, parts, data, it), dist_info.is_main)  # fmt: skip
    total_iters = cfg.train.max_iters or cfg.optim.epochs * data.iters_per_epoch
    budget = None
    if cfg.train.time_budget_min > 0 and parts.sharded:
        raise ValueError("train.time_budget_min cannot time an FSDP run; set optim.epochs instead")
    if cfg.train.time_budget_min > 0 and not resume:
        budget = _fit_time_budget(cfg, data, parts, checkpointer, device, precision, dist_info, run_dir)
        total_iters = budget.iterations if not cfg.train.max_iters else min(cfg.train.max_iters, budget.iterations)
        if cfg.train.max_iters:  # written to config.json: a resume rebuilds the same schedules
            cfg.train.max_iters = total_iters
        (log.warning if budget.too_short else log.info)(budget.why())
    schedules = build_schedules(cfg, data.iters_per_epoch, total_iters, data.global_batch)
    _write_run_record(cfg, data, parts, run_dir, precision, device, dist_info, total_iters, budget, resume, start_iter)
    return train_loop(cfg, data, parts, schedules, checkpointer, run_dir, device, precision, dist_info,
                      start_iter, total_iters, on_step)  # fmt: skip


def _open_run(
    cfg: Config, out_dir: str | Path | None, resume: bool, device: torch.device, dist_info: DistInfo
) -> tuple[Config, Path, str]:
    """The run folder (new, or the one to resume with its own config), its log, the precision."""
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
    setup_logging(run_dir, dist_info.is_main)
    if warning := precision_warning(precision, kind):
        log.warning(warning)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    return cfg, run_dir, precision


def _state(cfg: Config, parts: TrainParts, data: TrainData, iteration: int) -> dict:
    """Everything a resume needs (a collective under FSDP: every rank calls it)."""
    return {
        "student": full_model_state(parts.student, parts.sharded),
        "teacher": full_model_state(parts.teacher, parts.sharded),
        "objective": parts.objective.state_dict(),
        "optimizer": full_optimizer_state(parts.student, parts.optimizer, parts.sharded),
        "scaler": parts.scaler.state_dict(),
        "rng": rng_state(),
        "iteration": iteration,
        "epoch": iteration // data.iters_per_epoch,
        "config": cfg.to_dict(),
    }


def _teacher_backbone_state(parts: TrainParts) -> dict[str, torch.Tensor]:
    """Full teacher backbone weights (a collective under FSDP: every rank calls it)."""
    full = full_model_state(parts.teacher, parts.sharded)
    return {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}


def _run_step(cfg, data, parts, batch, it, sched, precision, device, rank) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed_of(cfg.train.seed, it, rank))  # crops on the device, drop path
    if data.batch_crops is not None:
        batch.update(data.batch_crops.on_device(batch, device))
    return train_step(
        parts.model, parts.teacher, parts.objective, parts.optimizer, parts.scaler, batch, sched, precision, device,
        cfg.optim.clip_grad,
    )  # fmt: skip


def _write_run_record(cfg, data, parts, run_dir, precision, device, dist_info, total_iters, budget, resume, start):
    """config.json, the split manifest and run_info.json: what any later reader needs to know."""
    backbone = parts.student.backbone
    head_dim = backbone.embed_dim // backbone.num_heads
    kernel = describe_attention(cfg.model.attention, device, DTYPES[precision], head_dim)
    if dist_info.is_main:
        cfg.save(run_dir / runs.CONFIG)
        data.split.write_manifest(run_dir / runs.SPLIT)
        info = {
            "preset": cfg.preset, "split_sha256": data.split.sha256, "data_root": str(data.data_root),
            "dataset": data_tag(cfg), "classes": data.split.classes, "n_pretrain_images": len(data.records),
            "iters_per_epoch": data.iters_per_epoch, "iters_per_pass": data.iters_per_pass,
            "total_iters": total_iters, "global_batch": data.global_batch,
            "precision": precision, "attention": cfg.model.attention, "attention_kernel": kernel,
            "grad_checkpointing": cfg.train.grad_checkpointing, "augment_on": data.augment_on,
            "num_workers": cfg.data.num_workers, "device": str(device), "device_name": device_name(device),
            "world_size": dist_info.world, "torch": torch.__version__,
        }  # fmt: skip
        if budget is not None:
            info["time_budget"] = budget.to_dict()
        if resume:  # what the run measured before this resume stays
            previous = runs.run_info(run_dir)
            info.update({k: previous[k] for k in ("time_budget", "train_seconds") if k in previous})
        (run_dir / runs.RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        write_crops_example(cfg, data.records, run_dir / runs.CROPS_EXAMPLE)
        metrics_path = run_dir / runs.METRICS
        truncate_metrics(metrics_path, start)
        if budget is not None and budget.knn:  # the untrained teacher, measured while timing
            with metrics_path.open("a") as handle:
                handle.write(json.dumps({"iteration": 0, "epoch": 0, **budget.knn}) + "\n")
    log.info(
        "pre-training %s: %d images, %d iterations (%d/epoch), global batch %d, %s on %s (%s), attention: %s, "
        "augmentation on the %s (%d loader workers)",
        cfg.preset, len(data.records), total_iters, data.iters_per_epoch, data.global_batch, precision, device,
        device_name(device), kernel, data.augment_on, cfg.data.num_workers,
    )  # fmt: skip


def train_loop(
    cfg: Config, data: TrainData, parts: TrainParts, schedules: Schedules, checkpointer: Checkpointer,
    run_dir: Path, device: torch.device, precision: str, dist_info: DistInfo, start_iter: int, total_iters: int,
    on_step=None,
) -> RunResult:  # fmt: skip
    """One pass over the run's iterations: step, metrics at log steps, kNN at epoch ends, stop, save."""
    problems, health = ProblemLog(), StepHealth(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    board = run_dir / "tensorboard" if cfg.train.tensorboard else None
    metrics = MetricsLog(run_dir / runs.METRICS, device, total_iters, start_iter, dist_info.is_main, board)
    data.sampler.set_range(start_iter, total_iters)
    status, it, ipe, loop_start = "finished", start_iter, data.iters_per_epoch, time.perf_counter()
    fetch_start = time.perf_counter()
    with StopFlag() as stop:
        for batch in data.loader if start_iter < total_iters else ():
            wait = time.perf_counter() - fetch_start
            for name, reason in batch["bad"]:
                problems.add(name, reason)
            if batch["size"]:
                sched = schedules.at(it)
                try:
                    loss, logs = _run_step(cfg, data, parts, batch, it, sched, precision, device, dist_info.rank)
                except torch.OutOfMemoryError:
                    metrics.close()
                    raise TrainingOutOfMemory(oom_message(cfg, it, checkpointer.path)) from None
                centres = (parts.objective.dino_center.center, parts.objective.ibot_center.center)
                health.observe(it, loss, logs, grads_count=not parts.scaler.is_enabled(), centres=centres)
                metrics.count(batch["size"] * dist_info.world, wait, logs.pop("amp_skipped", 0.0))
                logs.update({**sched, "iteration": it + 1, "epoch": it // ipe})
            it += 1
            if on_step is not None and batch["size"]:
                on_step(it, logs)
            due_knn = it % ipe == 0 and ((it // ipe) % cfg.train.knn_every_epochs == 0 or it == total_iters)
            log_step = it % cfg.train.log_every == 0 or it == total_iters
            boundary = log_step or due_knn or checkpointer.due(it, total_iters)
            # a signal is agreed across processes at boundaries only (an all-reduce waits for the step)
            stopping = any_rank(stop.requested, device) if boundary or dist_info.world == 1 else False
            last = it >= total_iters or stopping
            saving = checkpointer.due(it, total_iters) and not stopping
            if boundary or last:  # nothing is read, shown or saved before this check
                _stop_if_diverged(health, checkpointer.path, metrics)
            if log_step and batch["size"]:
                metrics.record(logs, parts.scaler.is_enabled())
            metrics.bar.update()
            if due_knn:
                _knn_check(cfg, data, parts, metrics, run_dir, device, precision, dist_info, it)
            if saving:
                checkpointer.save(it)
            if last:
                status = "interrupted" if stopping and it < total_iters else "finished"
                break
            fetch_start = time.perf_counter()
    metrics.close()
    problems.warn_once("pre-training")
    checkpointer.save(it)
    return _finish(parts, run_dir, status, it, metrics.last, dist_info, loop_start)


def _stop_if_diverged(health: StepHealth, ckpt_path: Path, metrics: MetricsLog) -> None:
    if (bad := health.first_bad()) is not None:
        metrics.close()
        raise TrainingDiverged(divergence_message(bad[1], bad[0], ckpt_path))


def _knn_check(cfg, data, parts, metrics, run_dir, device, precision, dist_info, it) -> None:
    """kNN of the teacher on the held-out split, logged, and the teacher snapshot kept."""
    backbone_state = _teacher_backbone_state(parts) if parts.sharded else parts.teacher.backbone.state_dict()
    if dist_info.is_main:
        eval_backbone = parts.teacher.backbone
        if parts.sharded:  # a plain, unsharded copy for the single-process kNN
            eval_backbone = build_architecture(cfg.model, cfg.crops.global_size).backbone.to(device)
            eval_backbone.load_state_dict(backbone_state)
        acc = knn_monitor(eval_backbone, data.split, cfg, device, precision)
        epoch = it // data.iters_per_epoch
        runs.save_atomic(backbone_state, run_dir / runs.SNAPSHOTS / f"teacher_{it:07d}.pt")
        if acc:  # data without labels: the snapshot only
            metrics.write({"iteration": it, "epoch": epoch, "knn_top1": acc["top1"], "knn_top5": acc["top5"]})
            log.info("epoch %d: kNN top-1 %.2f%%, top-5 %.2f%%", epoch, acc["top1"], acc["top5"])
    barrier()


def _finish(parts, run_dir, status, it, last_logs, dist_info, loop_start) -> RunResult:
    """The final teacher backbone (a finished run), train_seconds summed over resumes."""
    final_backbone = _teacher_backbone_state(parts)
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


def _fit_time_budget(cfg, data, parts, checkpointer, device, precision, dist_info, run_dir) -> BudgetChoice:
    """Time real steps (at lr 0, so no weight moves) and one kNN check, choose the epochs that fit,
    then put back what the measurement touched: optimizer moments, centres, loss scale."""
    objective, scaler = parts.objective, parts.scaler
    saved = {"objective": {k: v.clone() for k, v in objective.state_dict().items()}, "scaler": scaler.state_dict()}
    o, lo = cfg.optim, cfg.loss
    frozen = {"lr": 0.0, "wd": o.weight_decay, "momentum": o.momentum_teacher, "teacher_temp": lo.warmup_teacher_temp,
              "last_layer_lr": 0.0}  # fmt: skip
    knn: dict = {}
    probe = run_dir / ".budget-probe.pt"

    def step(batch: dict, i: int) -> None:
        _run_step(cfg, data, parts, batch, i, frozen, precision, device, dist_info.rank)
        synchronize(device)  # the step is done when the device is, not when its work is queued

    def knn_check() -> None:  # as in training: the check and its snapshot
        acc = knn_monitor(parts.teacher.backbone, data.split, cfg, device, precision)
        knn.update({"knn_top1": acc["top1"], "knn_top5": acc["top5"]} if acc else {})
        runs.save_atomic(parts.teacher.backbone.state_dict(), probe)

    def save_check() -> None:
        checkpointer.save(0, probe)
        probe.unlink(missing_ok=True)

    def batches():  # the first batches of the run, again if the run is shorter than the measurement
        while True:
            data.sampler.set_range(0, data.iters_per_epoch)
            yield from (b for b in data.loader if b["size"])

    choice = calibrate(
        cfg.train.time_budget_min, batches(), step, knn_check, save_check,
        data.iters_per_epoch, cfg.train.knn_every_epochs, cfg.train.checkpoint_every, max_epochs=cfg.optim.epochs,
    )  # fmt: skip
    parts.optimizer.state.clear()
    objective.load_state_dict(saved["objective"])
    scaler.load_state_dict(saved["scaler"])
    if dist.is_initialized():  # every process must train the same schedule: the slowest decides
        epochs = torch.tensor(choice.epochs, device=device)
        dist.all_reduce(epochs, op=dist.ReduceOp.MIN)
        choice.epochs = int(epochs.item())
    choice.knn = knn
    if choice.epochs < cfg.optim.epochs:  # warm-ups keep their share of the recipe (schedules.recipe_share)
        cfg.optim.recipe_epochs = cfg.optim.recipe_epochs or cfg.optim.epochs
    cfg.optim.epochs = choice.epochs  # written to config.json: resume and reruns follow the same schedule
    cfg.train.time_budget_min = 0.0
    return choice

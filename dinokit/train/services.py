"""What the training loop calls around each step: health, metrics, checkpoints, kNN, signals.

Each is small and owns one thing, so :func:`dinokit.train.loop.train_loop` reads like nanoGPT's
loop. The step itself never waits for the device: :class:`StepHealth` and :class:`MetricsLog`
keep its numbers on the device and read them (one host sync) at log steps, before a checkpoint
and before a kNN check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dinokit import runs
from dinokit.device import peak_memory_mb
from dinokit.train.dist import any_rank

log = logging.getLogger("dinokit.train")
LOSS_TERMS = ("loss_dino", "loss_ibot", "loss_koleo")
GRAD_NORMS = ("grad_norm_backbone", "grad_norm_dino_head", "grad_norm_ibot_head")
CENTRES = ("DINO centre", "iBOT centre")  # recorded as 1.0 (finite) or 0.0
RECORDED = (*LOSS_TERMS, "loss_total", *CENTRES)


class StopFlag:
    """SIGINT / SIGTERM ask the loop to save and stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
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


class StepHealth:
    """Whether every step so far had a finite loss, tracked on the device without a sync.

    It remembers the first non-finite step, its loss terms and whether the centres were still finite
    (to name the culprit). Read with
    :meth:`first_bad` at log steps, before saving and before kNN: a diverged run stops there, and
    the checkpoint on disk, written before it, is the last good one.
    """

    def __init__(self, device: torch.device) -> None:
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.bad_iteration = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(RECORDED), device=device)

    def observe(
        self, iteration: int, loss: torch.Tensor, logs: dict, grads_count: bool = True,
        centres: tuple[torch.Tensor, ...] = (),
    ) -> None:  # fmt: skip
        """``grads_count``: a non-finite gradient norm also counts (a finite loss can still give NaN
        gradients, which the optimizer would write into the weights). Not under fp16, where the
        loss scaler skips such steps itself."""
        finite = torch.isfinite(loss)
        if grads_count:
            for name in GRAD_NORMS:
                if name in logs:
                    finite = finite & torch.isfinite(logs[name])
        newly = self.ok & ~finite
        zero = loss.new_zeros((), dtype=torch.float32)
        terms = [logs[k].float() if k in logs else zero for k in LOSS_TERMS] + [loss.detach().float()]
        terms += [torch.isfinite(c).all().float() for c in centres] + [zero + 1] * (len(CENTRES) - len(centres))
        terms = torch.stack(terms)
        self.bad_iteration = torch.where(newly, iteration, self.bad_iteration)
        self.bad_terms = torch.where(newly, terms, self.bad_terms)
        self.ok &= ~newly

    def first_bad(self) -> tuple[int, dict[str, float]] | None:
        """``(iteration, loss terms)`` of the first non-finite step on any process, or None
        (iteration -1: it was another process's)."""
        if not any_rank(not bool(self.ok), self.ok.device):
            return None
        it = int(self.bad_iteration)
        return it, dict(zip(RECORDED, self.bad_terms.tolist(), strict=True))


class MetricsLog:
    """Throughput over a window of steps, ``metrics.jsonl`` lines and the progress bar."""

    def __init__(
        self, path: Path | None, device: torch.device, total: int, start: int, main: bool,
        tensorboard: Path | None = None,
    ) -> None:  # fmt: skip
        self.file = path.open("a") if path is not None and main else None
        self.board = tensorboard_writer(tensorboard) if tensorboard is not None and main else None
        self.device = device
        self.bar = tqdm(total=total, initial=start, desc="pre-training", disable=not main)
        self.last: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.window = {"start": time.perf_counter(), "images": 0, "wait": 0.0, "skipped": 0}

    def count(self, images: int, wait_s: float, amp_skipped: float = 0.0) -> None:
        self.window["images"] += images
        self.window["wait"] += wait_s
        self.window["skipped"] += int(amp_skipped)

    def record(self, logs: dict, fp16: bool) -> dict[str, float]:
        """Read the step's numbers (one sync for all), add the window's rates, write and show them."""
        names = [k for k, v in logs.items() if torch.is_tensor(v)]
        values = torch.stack([logs[k].detach().float().reshape(()) for k in names]).tolist() if names else []
        out = {**logs, **dict(zip(names, values, strict=True))}
        elapsed = max(time.perf_counter() - self.window["start"], 1e-9)
        out["images_per_s"] = self.window["images"] / elapsed
        out["data_wait_share"] = self.window["wait"] / elapsed
        out["peak_mem_mb"] = peak_memory_mb(self.device)
        if fp16:
            out["amp_skipped_steps"] = self.window["skipped"]  # fp16 overflows in this window
        self._reset()
        self.write(out)
        self.bar.set_postfix(
            loss=f"{out['loss_dino']:.3f}", lr=f"{out['lr']:.1e}", m=f"{out['momentum']:.4f}",
            img_s=f"{out['images_per_s']:.0f}", wait=f"{out['data_wait_share']:.0%}",
        )  # fmt: skip
        self.last = out
        return out

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.board is not None:  # the same scalars, against the same iteration
            for name, value in record.items():
                if name != "iteration" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.board.add_scalar(name, value, record["iteration"])

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def summary_writer_class() -> type:
    """PyTorch's own TensorBoard writer; it needs the ``tensorboard`` package, an optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package: `pip install tensorboard` "
            f"(or leave train.tensorboard off; metrics.jsonl has the same numbers) [{exc}]"
        ) from None
    return SummaryWriter


def tensorboard_writer(folder: Path):
    return summary_writer_class()(log_dir=str(folder))


class Checkpointer:
    """Saves the run atomically every ``every`` iterations and at the end (all ranks call it:
    gathering sharded state is a collective); only the main process writes."""

    def __init__(self, path: Path, every: int, state: Callable[[int], dict], main: bool) -> None:
        self.path, self.every, self.state, self.main = path, every, state, main

    def save(self, iteration: int, path: Path | None = None) -> None:
        state = self.state(iteration)
        if self.main:
            runs.save_atomic(state, path or self.path)

    def due(self, iteration: int, total: int) -> bool:
        return iteration % self.every == 0 and iteration < total


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """The run's ``train.log``: one file handler, replaced when another run starts in-process."""
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


def truncate_metrics(path: Path, start_iter: int) -> None:
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

"""A time budget for pre-training: measure this machine, then choose how long to train.

Before the schedules are built, a few real steps and one kNN check are timed; the run then trains
``optim.epochs``, or fewer if those do not fit the budget, and the choice is written into the run's
``config.json``, so a resumed run, the report and a rerun of that config all see the same, fixed
schedule. Machines differ 2-3x in speed (with or without AVX-512 / bf16): a fixed epoch count
overruns on the slow ones. The budget is a ceiling, not a target: on a fast machine more epochs
are not always better (on the embedded dataset, longer runs draw attention off the figure).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass


@dataclass
class BudgetChoice:
    minutes: float
    step_s: float  # median seconds per training step, data included
    knn_s: float  # seconds per kNN check (with its snapshot)
    save_s: float  # seconds per checkpoint
    calibration_s: float  # spent measuring (counts against the budget)
    iters_per_epoch: int
    knn_every_epochs: int
    checkpoint_every: int
    epochs: int
    max_epochs: int = 10_000  # the recipe's optim.epochs: the budget never trains longer
    knn: dict | None = None  # the untrained teacher's kNN, measured while timing

    @property
    def iterations(self) -> int:
        return self.epochs * self.iters_per_epoch

    def minimum_minutes(self) -> float:
        """The shortest budget that fits one epoch on this machine (timing included), in minutes."""
        args = (self.step_s, self.knn_s, self.save_s, self.iters_per_epoch, self.knn_every_epochs)
        return (self.calibration_s + run_seconds(1, *args, self.checkpoint_every)) / 60

    @property
    def too_short(self) -> bool:
        return self.minutes < self.minimum_minutes()

    def why(self) -> str:
        if self.too_short:
            return (
                f"time budget {self.minutes:g} min is too short for one epoch to fit on this machine (a step takes "
                f"{self.step_s:.3f} s, {self.iters_per_epoch} per epoch): it trains 1 epoch anyway, about "
                f"{self.minimum_minutes():.1f} min; set train.time_budget_min to at least {self.minimum_minutes():.1f}"
            )
        fit = (
            f"all {self.epochs} epochs of the recipe ({self.iterations} iterations) fit"
            if self.epochs >= self.max_epochs
            else f"{self.epochs} of the recipe's {self.max_epochs} epochs ({self.iterations} iterations) fit; "
            "the warm-ups and the prototype freeze keep their share of the run"
        )
        return (
            f"time budget {self.minutes:g} min: a step takes {self.step_s:.3f} s and a kNN check {self.knn_s:.1f} s "
            f"on this machine, so {fit}"
        )

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "knn"}
        return {**out, "iterations": self.iterations, "why": self.why()}


def knn_checks(epochs: int, every: int) -> int:
    """kNN checks in a run of ``epochs``: every ``every`` epochs, and always after the last."""
    return epochs // every + (1 if epochs % every else 0)


def run_seconds(
    epochs: int,
    step_s: float,
    knn_s: float,
    save_s: float,
    iters_per_epoch: int,
    knn_every: int,
    checkpoint_every: int,
) -> float:
    """Predicted wall time of a run: steps, kNN checks, periodic checkpoints and the two final saves."""
    iters = epochs * iters_per_epoch
    saves = max(0, (iters - 1) // checkpoint_every) + 2
    return iters * step_s + knn_checks(epochs, knn_every) * knn_s + saves * save_s


def epochs_that_fit(
    budget_s: float,
    step_s: float,
    knn_s: float,
    iters_per_epoch: int,
    knn_every: int,
    save_s: float = 0.0,
    checkpoint_every: int = 1 << 30,
    max_epochs: int = 10_000,
) -> int:
    """The most whole epochs whose steps, kNN checks and checkpoints fit in ``budget_s`` (at least 1)."""
    args = (step_s, knn_s, save_s, iters_per_epoch, knn_every, checkpoint_every)
    epochs = max(1, min(max_epochs, math.floor(budget_s / max(iters_per_epoch * step_s, 1e-9))))
    while epochs > 1 and run_seconds(epochs, *args) > budget_s:
        epochs -= 1
    return epochs


def calibrate(
    minutes: float,
    batches: Iterable[dict],
    step: Callable[[dict, int], None],
    knn: Callable[[], None],
    save: Callable[[], None],
    iters_per_epoch: int,
    knn_every: int,
    checkpoint_every: int,
    warmup: int = 10,
    timed: int = 8,
    max_epochs: int = 10_000,
) -> BudgetChoice:
    """Time ``warmup + timed`` calls of ``step`` on real batches, one ``knn`` check and one ``save``;
    fit the epochs (at most ``max_epochs``).

    The first steps of a run are slow while caches and the allocator warm up (a `cpu-demo` run on a
    2-core EPYC: 63 img/s over its first 10 steps, 92 after), so only steps after ``warmup`` are
    timed; with 2 warm-up steps the budget over-estimated the step by about 10 % and fitted an
    epoch fewer than it could.

    The caller restores the model, optimizer and centres afterwards: these steps are measurements.
    """
    start = time.perf_counter()
    durations = []
    batch_iter = iter(batches)
    for i in range(warmup + timed):
        t0 = time.perf_counter()
        step(next(batch_iter), i)  # the wait for the batch is part of a step's cost
        if i >= warmup:
            durations.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    knn()
    knn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    save()
    save_s = time.perf_counter() - t0
    step_s = statistics.median(durations)
    calibration_s = time.perf_counter() - start
    remaining = minutes * 60 - calibration_s
    epochs = epochs_that_fit(remaining, step_s, knn_s, iters_per_epoch, knn_every, save_s, checkpoint_every, max_epochs)
    return BudgetChoice(
        minutes, step_s, knn_s, save_s, calibration_s, iters_per_epoch, knn_every, checkpoint_every, epochs,
        max_epochs,
    )  # fmt: skip

"""The time budget: the epoch count that fits, by hand, and a budgeted run that records its choice."""

import json
from pathlib import Path

import pytest

from dinokit.config import make_config
from dinokit.runs import read_metrics
from dinokit.train.budget import BudgetChoice, calibrate, epochs_that_fit, knn_checks, run_seconds
from dinokit.train.loop import pretrain


def test_knn_checks_count_the_last_epoch_too() -> None:
    assert knn_checks(10, 2) == 5  # epochs 2, 4, 6, 8, 10
    assert knn_checks(9, 2) == 5  # 2, 4, 6, 8 and the last (9)
    assert knn_checks(1, 5) == 1


def test_epochs_that_fit_by_hand() -> None:
    # 10 iterations per epoch at 1 s, a kNN check of 5 s every 2 epochs, no checkpoints:
    # 4 epochs = 40 s + 2 checks = 50 s; 5 epochs = 50 s + 3 checks = 65 s.
    assert epochs_that_fit(64.9, 1.0, 5.0, 10, 2) == 4
    assert epochs_that_fit(65.0, 1.0, 5.0, 10, 2) == 5
    assert epochs_that_fit(1.0, 1.0, 5.0, 10, 2) == 1  # never fewer than one epoch
    # checkpoints every 15 iterations at 2 s each, plus the two final saves
    assert run_seconds(3, 1.0, 0.0, 2.0, 10, 100, 15) == 30 + (29 // 15 + 2) * 2.0


def test_the_budget_is_a_ceiling_on_the_recipes_epochs() -> None:
    """A fast machine trains the recipe's epochs, no more; a slow one as many as fit."""
    import itertools
    import time

    def run(minutes: float, step_s: float) -> BudgetChoice:
        return calibrate(
            minutes, itertools.repeat({}), lambda batch, i: time.sleep(step_s), lambda: None, lambda: None,
            iters_per_epoch=10, knn_every=1, checkpoint_every=1 << 30, warmup=0, timed=2, max_epochs=3,
        )  # fmt: skip

    fast = run(minutes=10.0, step_s=0.0)
    assert fast.epochs == 3 and "all 3 epochs of the recipe" in fast.why()
    slow = run(minutes=0.04, step_s=0.1)  # 2.4 s, 0.2 s of it timing: two epochs of 1 s fit, not three
    assert slow.epochs == 2 and "2 of the recipe's 3 epochs" in slow.why()
    assert epochs_that_fit(1e6, 1.0, 0.0, 10, 1, max_epochs=4) == 4


def test_a_budget_too_short_for_one_epoch_says_the_minimum() -> None:
    """One epoch: 10 steps of 1 s + a 5 s kNN check + 2 final saves of 0.5 s, after 3 s of timing = 19 s."""
    choice = BudgetChoice(0.2, 1.0, 5.0, 0.5, 3.0, iters_per_epoch=10, knn_every_epochs=1, checkpoint_every=1 << 30,
                          epochs=1, max_epochs=4)  # fmt: skip
    assert choice.minimum_minutes() == pytest.approx(19 / 60)
    assert choice.too_short and "set train.time_budget_min to at least 0.3" in choice.why()
    enough = BudgetChoice(0.32, 1.0, 5.0, 0.5, 3.0, 10, 1, 1 << 30, epochs=1, max_epochs=4)
    assert not enough.too_short and "1 of the recipe's 4 epochs" in enough.why()


@pytest.mark.slow
def test_a_budgeted_run_times_itself_and_records_the_choice(env: Path) -> None:
    tmp_path = env
    result = pretrain(make_config("ci", {"train.time_budget_min": 0.1}), out_dir=tmp_path / "r", device="cpu")
    info = json.loads((tmp_path / "r" / "run_info.json").read_text())
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    budget = info["time_budget"]
    assert budget["epochs"] == saved["optim"]["epochs"] >= 1 and saved["train"]["time_budget_min"] == 0.0
    assert result.iteration == info["total_iters"] == budget["iterations"]
    assert "fit" in budget["why"] and budget["step_s"] > 0 and info["train_seconds"] > 0
    capped = budget["epochs"] < budget["max_epochs"]  # then the warm-ups keep their share of the recipe
    assert saved["optim"]["recipe_epochs"] == (budget["max_epochs"] if capped else 0)
    knn = [m for m in read_metrics(tmp_path / "r") if "knn_top1" in m]
    assert knn[0]["iteration"] == 0  # the untrained teacher, measured while timing: the curve's start
    # a rerun of the saved config trains exactly the same schedule, without timing again
    again = pretrain(make_config("ci", saved_overrides(saved)), out_dir=tmp_path / "again", device="cpu")
    assert again.iteration == result.iteration


def saved_overrides(saved: dict) -> dict:
    return {f"{section}.{k}": v for section, values in saved.items() if isinstance(values, dict)
            for k, v in values.items()}  # fmt: skip

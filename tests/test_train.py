"""Integration tests on the ``ci`` preset: a few seconds of real training each."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from dinokit.config import make_config
from dinokit.runs import CheckpointError, load_backbone, load_checkpoint, read_metrics, run_progress, save_atomic
from dinokit.train.loop import TrainingDiverged, pretrain


def _cfg(**extra):
    return make_config("ci", {"train.knn_every_epochs": 2, **extra})


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["iteration"]: m["loss_dino"] for m in read_metrics(run_dir) if "loss_dino" in m}


def test_ci_run_writes_a_complete_run_directory(env: Path) -> None:
    result = pretrain(_cfg(), out_dir=env / "run")
    assert result.status == "finished"
    run = env / "run"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "teacher_backbone.pt", "split.csv", "train.log"):
        assert (run / name).is_file(), name
    metrics = read_metrics(run)
    steps = [m for m in metrics if "loss_dino" in m]
    assert len(steps) == result.iteration == run_progress(run)[1]
    assert {"loss_dino", "loss_ibot", "loss_koleo", "teacher_entropy", "teacher_kl_uniform", "lr", "momentum"} <= steps[
        0
    ].keys()
    assert any("knn_top1" in m for m in metrics)
    info = json.loads((run / "run_info.json").read_text())
    assert len(info["split_sha256"]) == 64
    # teacher and student differ (EMA lags), and the backbone loads back
    state = load_checkpoint(run / "checkpoint.pt")
    assert not torch.equal(state["teacher"]["backbone.pos_embed"], state["student"]["backbone.pos_embed"])
    assert load_backbone(run)(torch.randn(1, 3, 32, 32)).shape == (1, 48)


def test_interrupted_run_resumes_on_the_same_trajectory(env: Path) -> None:
    cfg = _cfg()
    full = pretrain(cfg, out_dir=env / "full")

    def interrupt_at_5(iteration: int, logs: dict) -> None:
        if iteration == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal path: save, then stop

    part = pretrain(_cfg(), out_dir=env / "part", on_step=interrupt_at_5)
    assert part.status == "interrupted" and part.iteration == 5
    assert run_progress(env / "part") == (5, full.iteration)
    resumed = pretrain(_cfg(), out_dir=env / "part", resume=True)
    assert resumed.status == "finished" and resumed.iteration == full.iteration
    a, b = _losses(env / "full"), _losses(env / "part")
    assert a.keys() == b.keys()
    for it in a:
        assert a[it] == pytest.approx(b[it], rel=1e-5, abs=1e-6), it
    sa = load_checkpoint(env / "full" / "checkpoint.pt")["teacher"]
    sb = load_checkpoint(env / "part" / "checkpoint.pt")["teacher"]
    for key in sa:
        assert torch.allclose(sa[key], sb[key], atol=1e-5), key


def test_existing_run_is_not_overwritten(env: Path) -> None:
    pretrain(_cfg(**{"train.max_iters": 2}), out_dir=env / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(_cfg(), out_dir=env / "run")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain(_cfg(), out_dir=env / "empty", resume=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_checkpoint(env: Path, monkeypatch) -> None:
    from dinokit.losses import objective

    real = objective.DINOv2Objective.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        total, logs = real(self, *args, **kwargs)
        calls["n"] += 1
        return (total * float("nan") if calls["n"] > 5 else total), logs

    monkeypatch.setattr(objective.DINOv2Objective, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="iteration 5"):
        pretrain(_cfg(), out_dir=env / "run")
    assert load_checkpoint(env / "run" / "checkpoint.pt")["iteration"] == 4  # checkpoint_every=4


def test_sinkhorn_and_registers_run(env: Path) -> None:
    result = pretrain(
        _cfg(**{"loss.normalization": "sinkhorn", "model.n_registers": 2, "train.max_iters": 3}), out_dir=env / "r"
    )
    assert result.status == "finished" and result.iteration == 3


def test_atomic_save_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))


def test_checkpoint_loading_never_runs_code(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.slow
def test_torch_compile_option_trains(env: Path) -> None:
    """``train.compile``: the compiled student's parameters are found by the EMA and saved."""
    result = pretrain(_cfg(**{"train.compile": True, "train.max_iters": 2}), out_dir=env / "c")
    assert result.status == "finished"
    state = load_checkpoint(env / "c" / "checkpoint.pt")
    assert not any(k.startswith("_orig_mod") for k in state["student"])


def test_ablations_train_on_a_fresh_machine_then_only_open(env: Path, capsys) -> None:
    """The variants pin the embedded dataset, so they must generate it themselves; a second call retrains nothing."""
    from dinokit.ablations import VARIANTS, knn_curves, reference_lines, run_ablations

    variants = {k: VARIANTS[k] for k in ("full DINOv2", "KoLeo off")}
    first = run_ablations("ci", variants, device="cpu")
    assert all(run_progress(d)[0] == run_progress(d)[1] > 0 for d in first.values())
    stamps = {d: (d / "checkpoint.pt").stat().st_mtime_ns for d in first.values()}
    capsys.readouterr()
    again = run_ablations("ci", variants, device="cpu")
    assert again == first and {d: (d / "checkpoint.pt").stat().st_mtime_ns for d in again.values()} == stamps
    assert capsys.readouterr().out.count("opening the finished run") == 2
    assert all(knn_curves(first).values())
    assert reference_lines("ci", device="cpu")["chance"] == 100 / 12


def test_nan_gradients_with_a_finite_loss_never_reach_a_checkpoint(env: Path, monkeypatch) -> None:
    """The step is not synced, so a bad step is found at the next check: it must come before any save."""
    from dinokit.losses import objective

    real = objective.DINOv2Objective.forward
    calls = {"n": 0}

    def poisoned(self, student, *args, **kwargs):
        total, logs = real(self, student, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 5:  # value 0, gradient 0 * inf = NaN: the loss stays finite
            total = total + 0 * torch.sqrt(student["cls"].sum() * 0)
        return total, logs

    monkeypatch.setattr(objective.DINOv2Objective, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="gradients .* at iteration 5"):
        pretrain(_cfg(**{"train.log_every": 1000}), out_dir=env / "run")  # checks at saves only (every 4)
    state = load_checkpoint(env / "run" / "checkpoint.pt")
    assert state["iteration"] == 4 and all(torch.isfinite(v).all() for v in state["student"].values())


def test_epoch_length_decouples_schedule_epochs_from_passes_over_the_data(env: Path) -> None:
    """``optim.epoch_length`` = N: schedules count epochs of N iterations (DINOv2 counts 1,250), while
    the sampler keeps cycling through fresh permutations of the data."""
    pass_length = (
        pretrain(_cfg(**{"train.max_iters": 1}), out_dir=env / "probe").iteration
        and json.loads((env / "probe" / "run_info.json").read_text())["iters_per_pass"]
    )
    length = pass_length + 3  # an epoch that is longer than one pass
    result = pretrain(_cfg(**{"optim.epoch_length": length, "train.knn_every_epochs": 5}), out_dir=env / "r")
    info = json.loads((env / "r" / "run_info.json").read_text())
    assert (info["iters_per_epoch"], info["iters_per_pass"]) == (length, pass_length)
    assert result.iteration == info["total_iters"] == 2 * length  # ci: 2 epochs
    steps = [m for m in read_metrics(env / "r") if "lr" in m]
    lrs = [m["lr"] for m in steps]
    # ci's 1-epoch warm-up takes `length` iterations: 0 ... peak at `length - 1` (DINO's linspace), then the cosine
    assert lrs.index(max(lrs)) == length - 1 and lrs[length] == pytest.approx(max(lrs)) and lrs[length + 1] < max(lrs)
    assert [m["epoch"] for m in steps] == [i // length for i in range(len(steps))]  # step i is in epoch i // length


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_last_checkpoint(env: Path, monkeypatch) -> None:
    import errno

    import dinokit.runs as runs_module

    real, writes = torch.save, []

    def disk_fills_up(obj, handle, *args, **kwargs):
        if ".checkpoint.pt.tmp" in str(getattr(handle, "name", "")):
            writes.append(1)
            if len(writes) == 2:  # the second checkpoint hits a full disk, halfway through
                handle.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, handle, *args, **kwargs)

    monkeypatch.setattr(runs_module.torch, "save", disk_fills_up)
    run = env / "r"
    with pytest.raises(runs_module.DiskFullError, match=r"disk is full.*previous checkpoint.pt is intact.*--resume"):
        pretrain(_cfg(**{"train.checkpoint_every": 2, "train.max_iters": 6}), out_dir=run)
    assert run_progress(run)[0] == 2  # the first checkpoint, untouched
    assert not list(run.glob(".checkpoint.pt.tmp*"))  # no half-written file left behind

"""Two CPU processes (gloo; DDP or FSDP) take the same step as one process on the same global batch."""

import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinokit.config import make_config
from dinokit.runs import load_checkpoint
from dinokit.train.dist import close_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tmp: str) -> dict:
    # KoLeo is computed within each process's batch (as in DINOv2), so it is the one term that
    # legitimately differs between 1x16 and 2x8; switch it off to compare the rest exactly.
    return {
        "train.max_iters": 2,
        "train.knn_every_epochs": 1000,
        "loss.koleo_weight": 0.0,
        "model.drop_path": 0.0,  # stochastic depth draws per process
        "data.augment_on": "loader",  # crops seeded per image (device crops are seeded per process)
        "optim.freeze_last_layer_epochs": 0,
    }


def _worker(
    rank: int, world: int, port: int, tmp: str, out: str, extra: dict, resume: bool = False, stop_at: int = 0
) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port), "DINOKIT_DATA_DIR": os.path.join(tmp, "data")}
    )  # fmt: skip
    torch.set_num_threads(1)
    from dinokit.train import setup
    from dinokit.train.loop import pretrain

    extra = dict(extra)
    if extra.pop("lean", False):  # the blocks as a GPU runs them (the CPU's choice is off)
        setup.lean_branches_pay = lambda device_type: True

    def signal_rank0(iteration: int, logs: dict) -> None:
        if rank == 0 and iteration == stop_at:  # a signal that reaches one process only
            os.kill(os.getpid(), signal.SIGINT)

    cfg = make_config("ci", {**_overrides(tmp), "optim.batch_size": 16 // world, **extra})
    result = pretrain(cfg, out_dir=out, resume=resume, on_step=signal_rank0 if stop_at else None)
    close_distributed()
    Path(out, f"status_rank{rank}.txt").write_text(f"{result.status} {result.iteration}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [{}, {"train.fsdp": True}, {"train.fsdp": True, "lean": True}], ids=["ddp", "fsdp", "fsdp-lean"]
)
def test_two_process_step_matches_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict) -> None:
    monkeypatch.setenv("DINOKIT_DATA_DIR", str(tmp_path / "data"))
    from dinokit.train.loop import pretrain

    single = tmp_path / "single"
    pretrain(make_config("ci", {**_overrides(str(tmp_path)), "optim.batch_size": 16}), out_dir=single)
    double = tmp_path / "double"
    args = (2, _free_port(), str(tmp_path), str(double), extra)
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    a = load_checkpoint(single / "checkpoint.pt")
    b = load_checkpoint(double / "checkpoint.pt")
    for part in ("student", "teacher"):
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-5, rtol=1e-4), (part, key)
    assert torch.allclose(a["objective"]["dino_center.center"], b["objective"]["dino_center.center"], atol=1e-6)


@pytest.mark.slow
def test_fsdp_run_stopped_by_one_process_resumes_on_the_same_trajectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DINOKIT_DATA_DIR", str(tmp_path / "data"))
    fsdp = {"train.fsdp": True, "train.max_iters": 4}
    full, part = tmp_path / "full", tmp_path / "part"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), str(full), fsdp), nprocs=2, start_method="spawn")
    # SIGINT reaches rank 0 only, after step 2: both processes must stop there together (else
    # rank 1 would wait forever in its next collective) and save one checkpoint.
    args = (2, _free_port(), str(tmp_path), str(part), fsdp, False, 2)
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    assert [(part / f"status_rank{r}.txt").read_text() for r in (0, 1)] == ["interrupted 2"] * 2
    assert int(load_checkpoint(part / "checkpoint.pt")["iteration"]) == 2
    args = (2, _free_port(), str(tmp_path), str(part), fsdp, True)  # resume: sharded load of the full state
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    assert [(part / f"status_rank{r}.txt").read_text() for r in (0, 1)] == ["finished 4"] * 2
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    for state in ("student", "teacher"):
        for key in a[state]:
            assert torch.allclose(a[state][key], b[state][key], atol=1e-6), (state, key)
    for key, value in a["optimizer"]["state"].items():  # AdamW moments came back shard by shard
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(value[name], b["optimizer"]["state"][key][name], atol=1e-7), (key, name)

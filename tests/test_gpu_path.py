"""The GPU path, proven on the CPU: fp16 with a grad scaler, device plumbing, runs that know their
data, activation checkpointing, out-of-memory messages."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.config import make_config
from dinokit.runs import DataMismatchError, default_run_dir, load_checkpoint, read_metrics
from dinokit.train.loop import TrainingOutOfMemory, pretrain


def _fp16(**extra):
    return make_config("ci", {"train.precision": "fp16", "train.knn_every_epochs": 100, **extra})


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "loss_dino" in m]


def test_fp16_with_a_grad_scaler_trains_counts_skips_and_resumes_exactly(env: Path) -> None:
    """CPU autocast supports float16 and GradScaler("cpu") works: the fp16 path of a T4, tested here."""
    full = pretrain(_fp16(), out_dir=env / "full", device="cpu")
    steps = _steps(env / "full")
    assert full.status == "finished" and all("loss_scale" in m and "amp_skipped_steps" in m for m in steps)
    info = json.loads((env / "full" / "run_info.json").read_text())
    assert info["precision"] == "fp16"
    scales = [m["loss_scale"] for m in steps]
    skipped = sum(m["amp_skipped_steps"] for m in steps)
    # dynamic loss scaling: every overflow halves the scale (2^16 to start), and is counted
    assert scales[-1] == 2.0**16 / 2**skipped
    assert (skipped > 0) == (min(scales) < 2.0**16)

    def stop_at_5(iteration: int, logs: dict) -> None:
        if iteration == 5:
            os.kill(os.getpid(), signal.SIGINT)

    part = pretrain(_fp16(), out_dir=env / "part", on_step=stop_at_5, device="cpu")
    assert part.status == "interrupted"
    assert load_checkpoint(env / "part" / "checkpoint.pt")["scaler"]["scale"] == scales[4]
    pretrain(_fp16(), out_dir=env / "part", resume=True, device="cpu")
    resumed = _steps(env / "part")
    assert [m["loss_dino"] for m in resumed] == [m["loss_dino"] for m in steps]
    assert [m["loss_scale"] for m in resumed] == scales
    a, b = load_checkpoint(env / "full" / "checkpoint.pt"), load_checkpoint(env / "part" / "checkpoint.pt")
    assert a["scaler"] == b["scaler"]
    for key, value in a["teacher"].items():
        assert torch.equal(value, b["teacher"][key]), key


def test_an_overflowing_fp16_step_is_skipped_not_applied(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scale so large that every gradient overflows: the scaler skips every optimizer step."""
    from dinokit.train import setup

    monkeypatch.setattr(setup, "grad_scaler", lambda precision, device: torch.amp.GradScaler("cpu", init_scale=2.0**80))
    result = pretrain(_fp16(**{"train.max_iters": 3, "train.checkpoint_every": 1000}), out_dir=env / "r", device="cpu")
    steps = _steps(result.run_dir)
    assert sum(m["amp_skipped_steps"] for m in steps) == 3
    state = load_checkpoint(result.run_dir / "checkpoint.pt")
    # AdamW never stepped: the fused kernel (told of the overflow by the scaler) undid its step counts
    # and left the moments at zero, or (other implementations) no state exists at all
    for moments in state["optimizer"]["state"].values():
        assert float(moments["step"]) == 0 and not moments["exp_avg"].any() and not moments["exp_avg_sq"].any()


def test_device_cuda_without_cuda_fails_before_any_work(env: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (["pretrain", "--preset", "ci"], ["demo", "--preset", "ci"], ["bench"], ["eval", str(env)]):
        assert main([*argv, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not (env / "runs").exists() and not (env / "data").exists()


def test_the_device_reaches_feature_extraction_and_every_baseline(env: Path, monkeypatch) -> None:
    from dinokit.eval import run_eval

    run = pretrain(make_config("ci", {"train.max_iters": 2}), device="cpu").run_dir
    seen = []
    real = run_eval.extract_features

    def spy(backbone, records, size, **kw):
        seen.append((kw["device"], kw["precision"], type(backbone).__name__))
        return real(backbone, records, size, **kw)

    monkeypatch.setattr(run_eval, "extract_features", spy)
    run_eval.evaluate_run(run, device="cpu")
    assert len(seen) == 6  # train / val / test for the run's teacher and for the random-init baseline
    assert {d for d, _, _ in seen} == {torch.device("cpu")}
    assert {p for _, p, _ in seen} == {"bf16" if run_eval.device_kind("cpu").native_bf16 else "fp32"}


def test_runs_know_their_data(env: Path, kaggle_root: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cfg = make_config("ci", {"train.max_iters": 2})
    assert default_run_dir(cfg).name == "ci-embedded"
    run = pretrain(cfg, device="cpu").run_dir
    assert run == default_run_dir(cfg)
    assert json.loads((run / "run_info.json").read_text())["dataset"] == "embedded"
    # Now point DINOKIT_DATA at another dataset (a HAR-like folder): a different default folder...
    har = kaggle_root.rename(kaggle_root.parent / "human-action-recognition")
    monkeypatch.setenv("DINOKIT_DATA", str(har))
    assert default_run_dir(cfg).name == "ci-har"
    # ...and opening the embedded-data run on it says so and names the fix, never evaluates in silence.
    from dinokit.eval.run_eval import evaluate_run

    with pytest.raises(DataMismatchError, match="unset DINOKIT_DATA") as err:
        evaluate_run(run, device="cpu")
    assert "not the one ci-embedded was trained on" in str(err.value) and "runs/ci-<dataset>" in str(err.value)
    assert main(["attention", str(run), "--device", "cpu"]) == 2
    assert "not the one" in capsys.readouterr().err
    with pytest.raises(DataMismatchError):
        pretrain(cfg, out_dir=run, resume=True, device="cpu")


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    from dinokit.models.vit import build_vit

    torch.manual_seed(0)
    vit = build_vit("vit_pico", patch_size=8, img_size=32, drop_path=0.2).train()
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        vit.grad_checkpointing = checkpointing
        vit.zero_grad()
        torch.manual_seed(1)  # the same stochastic depth draws (checkpoint replays the RNG state)
        vit.forward_features(x)["patch"].square().mean().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in vit.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_out_of_memory_names_the_knobs_and_keeps_the_checkpoint(env: Path, monkeypatch) -> None:
    from dinokit.train import loop

    real = loop.train_step
    calls = {"n": 0}

    def oom_at_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", oom_at_6)
    with pytest.raises(TrainingOutOfMemory) as err:
        pretrain(make_config("ci", {"model.attention": "naive"}), out_dir=env / "r", device="cpu")
    text = str(err.value)
    assert "optim.batch_size=8" in text and "train.grad_checkpointing=true" in text and "model.attention=sdpa" in text
    assert load_checkpoint(env / "r" / "checkpoint.pt")["iteration"] == 4  # checkpoint_every=4: intact
    # the message's own advice works: resume with checkpointing on, from the intact checkpoint
    monkeypatch.setattr(loop, "train_step", real)
    assert main(["pretrain", "--out", str(env / "r"), "--resume", "--set", "train.grad_checkpointing=true"]) == 0
    assert json.loads((env / "r" / "run_info.json").read_text())["grad_checkpointing"] is True
    assert main(["pretrain", "--out", str(env / "r"), "--resume", "--set", "optim.batch_size=4"]) == 2


def test_feature_extraction_halves_a_batch_that_does_not_fit(monkeypatch) -> None:
    from dinokit.data.har import Record
    from dinokit.eval import features
    from dinokit.models.vit import build_vit
    from tests.conftest import jpeg_bytes

    records = [Record(f"{i}.jpg", i % 3, None, jpeg_bytes(i)) for i in range(10)]
    vit = build_vit("vit_pico", patch_size=8, img_size=16)
    expected = features.extract_features(vit, records, 16, batch_size=10, progress=False)["features"]["cls"]
    real = features.features_of

    def small_memory(backbone, images, kinds):
        if len(images) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(backbone, images, kinds)

    monkeypatch.setattr(features, "features_of", small_memory)
    got = features.extract_features(vit, records, 16, batch_size=10, progress=False)["features"]["cls"]
    assert torch.allclose(got, expected, atol=1e-6)


def test_flash_attn_backend_where_it_cannot_run_stops_before_training(env: Path) -> None:
    with pytest.raises(ValueError, match="use 'sdpa'"):
        pretrain(make_config("ci", {"model.attention": "flash-attn"}), out_dir=env / "r", device="cpu")
    assert not (env / "r").exists()


@pytest.mark.slow
def test_the_gpu_smoke_script_runs_at_toy_sizes_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_smoke.sh cannot rot before a GPU reaches it: the same steps, toy sizes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHON": sys.executable, "DINOKIT_RUNS": str(tmp_path / "runs")}
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_smoke.sh"), "--tiny", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("gpu-smoke-*-tiny.json")).read_text())
    assert not summary["failed"]
    assert set(summary["steps"]) == {
        "data", "pretrain_sdpa", "pretrain_naive", "pretrain_ci_capped_16gb", "matmul_rate", "breakdown_sdpa",
        "breakdown_naive", "eval", "attention", "bench", "report",
    }  # fmt: skip
    for backend in ("sdpa", "naive"):  # the step's numbers the GPU goals are stated in
        record = summary["steps"][f"breakdown_{backend}"]
        assert record["syncs_per_step"] == 0 and record["gflop_per_image"] > 0 and record["mfu"] > 0
        assert {"teacher forward", "heads and losses", "backward", "optimizer"} <= record["phases_ms"].keys()
    for backend in ("sdpa", "naive"):
        line = summary["steps"][f"pretrain_{backend}"]
        assert line["images_per_s"] > 0 and line["peak_mem_mb"] > 0 and 0 <= line["data_wait_share"] <= 1
    assert "FlashAttention" in summary["steps"]["pretrain_sdpa"]["attention_kernel"]
    assert "naive" in summary["steps"]["pretrain_naive"]["attention_kernel"]
    for word in ("pretrain ci sdpa", "img/s", "peak", "data wait", "bench inference", "report:"):
        assert word in done.stdout
    assert (tmp_path / "report.html").is_file()


def test_a_run_whose_own_data_changed_says_so(env: Path) -> None:
    """The same folder with different images (a regenerated embedded dataset): retrain, not 'unset'."""
    from dinokit import runs

    run = pretrain(make_config("ci", {"train.max_iters": 2}), device="cpu").run_dir
    root = json.loads((run / "run_info.json").read_text())["data_root"]
    with pytest.raises(DataMismatchError, match="changed since ci-embedded was trained") as err:
        runs.check_data(run, "0" * 64, root)
    assert f"delete {run}" in str(err.value)


def test_notebook_runs_for_overrides_get_their_own_folder(env: Path) -> None:
    from dinokit.notebook import run_for

    default, _ = run_for("ci")
    variant, cfg = run_for("ci", overrides=["loss.koleo_weight=0"])
    same, _ = run_for("ci", overrides=["loss.koleo_weight=0"])
    assert default.name == "ci-embedded" and variant.name.startswith("ci-embedded-") and variant == same
    assert cfg.loss.koleo_weight == 0
    named, _ = run_for("ci", run_name="my-ablation")
    assert named.name == "my-ablation"

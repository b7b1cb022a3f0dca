"""``dinokit eval`` on a tiny trained run: outputs, baselines and clear errors."""

import csv
import json
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.config import make_config
from dinokit.eval.run_eval import EvalError, evaluate_run
from dinokit.train.loop import pretrain


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("evalrun")
    mp = pytest.MonkeyPatch()
    mp.setenv("DINOKIT_DATA_DIR", str(tmp / "data"))
    mp.delenv("DINOKIT_DATA", raising=False)
    pretrain(make_config("ci", {"train.max_iters": 4}), out_dir=tmp / "run")
    yield tmp / "run"
    mp.undo()


def test_eval_writes_metrics_and_baselines(trained: Path, capsys) -> None:
    assert main(["eval", str(trained)]) == 0
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    for key in ("knn", "linear"):
        assert 0 <= metrics[key]["top1"] <= 100
    base = metrics["baselines"]
    assert 0 <= base["random_init"]["knn"]["top1"] <= 100 and 0 <= base["random_init"]["linear"]["top1"] <= 100
    assert 0 <= base["pixels"]["linear"]["top1"] <= 100
    assert set(metrics["knn"]["by_k"]) == {"k10", "k20", "k100", "k200"}
    rows = list(csv.DictReader((trained / "eval" / "per_class.csv").open()))
    assert len(rows) == len(metrics["classes"])
    preds = list(csv.DictReader((trained / "eval" / "predictions.csv").open()))
    assert preds and set(preds[0]) == {"filename", "label"} and preds[0]["label"] in metrics["classes"]
    out = capsys.readouterr().out
    assert "random init" in out and "raw pixels" in out and "chance" in out
    # the embedded dataset has silhouettes: the attention is scored on the whole image
    jac = metrics["attention_jaccard"]
    assert jac["geometry"].startswith("whole image") and jac["images"] == len(rows_val(trained))
    assert 0 <= jac["teacher"] <= 100 and 0 <= jac["random_init"] <= 100
    assert 0 <= jac["pca"]["teacher"] <= 100 and 0 <= jac["pca"]["random_init"] <= 100
    assert "patch-PCA foreground" in out


def rows_val(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "eval" / "val_predictions.csv").open()))


def test_jaccard_script_rescores_without_touching_the_eval(trained: Path, monkeypatch, capsys) -> None:
    import runpy
    import sys

    if not (trained / "eval" / "metrics.json").is_file():
        evaluate_run(trained, baselines=False)
    before = (trained / "eval" / "metrics.json").read_bytes()
    monkeypatch.setattr(sys, "argv", ["jaccard_of_run.py", str(trained)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "jaccard_of_run.py"), run_name="__main__")
    assert done.value.code == 0
    out = json.loads(capsys.readouterr().out)
    scored = json.loads(before)["attention_jaccard"]
    assert out["teacher"] == pytest.approx(scored["teacher"])  # the same numbers as the eval's
    assert out["random_init"] == pytest.approx(scored["random_init"])
    assert out["snapshots"] == pytest.approx(scored["snapshots"])
    assert out["ratio"] == pytest.approx(scored["teacher"] / scored["random_init"])
    assert (trained / "eval" / "metrics.json").read_bytes() == before
    monkeypatch.setattr(sys, "argv", ["jaccard_of_run.py", str(trained / "nowhere")])
    with pytest.raises(SystemExit) as done:  # a message, not a traceback
        runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "jaccard_of_run.py"), run_name="__main__")
    assert done.value.code == 2 and "not a run directory" in capsys.readouterr().err


def test_eval_errors_name_the_fix(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="no checkpoint"):
        evaluate_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("checkpoint.pt", "run_info.json"):
        (broken / name).write_bytes((trained / name).read_bytes())
    cfg = json.loads((trained / "config.json").read_text())
    cfg["model"]["embed_dim"] = 64
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvalError, match="does not fit the architecture"):
        evaluate_run(broken, baselines=False)
    mismatched = tmp_path / "mismatch"
    mismatched.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (mismatched / name).write_bytes((trained / name).read_bytes())
    info = json.loads((trained / "run_info.json").read_text())
    info["split_sha256"] = "0" * 64
    (mismatched / "run_info.json").write_text(json.dumps(info))
    # Same folder, other images: the data was regenerated or edited since training.
    with pytest.raises(EvalError, match="changed since mismatch was trained"):
        evaluate_run(mismatched, baselines=False)
    # Another folder altogether: the message says how to go back or train anew.
    info["data_root"] = str(tmp_path / "some-other-dataset")
    (mismatched / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(EvalError, match="is not the one mismatch was trained on"):
        evaluate_run(mismatched, baselines=False)


def test_eval_features_are_cached(trained: Path) -> None:
    evaluate_run(trained, baselines=False)
    cached = list((trained / "eval").glob("features_teacher_*.pt"))
    assert len(cached) == 1
    data = torch.load(cached[0], weights_only=True)
    assert {"train", "val", "test"} <= data.keys()


def test_knn_only_and_the_dinov2_reference_row(trained: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """With local DINOv2 weights (here: a random timm ViT-S/14 saved to a file, since nothing
    can be downloaded), the table gains the official model as a reference row."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    weights = tmp_path / "dinov2.safetensors"
    state = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    monkeypatch.setenv("DINOKIT_DINOV2_WEIGHTS", str(weights))
    assert main(["eval", str(trained), "--knn"]) == 0
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    assert "knn" in metrics and "linear" not in metrics
    ref = metrics["baselines"]["dinov2_official"]
    assert ref["image_size"] == 28 and 0 <= ref["knn"]["top1"] <= 100
    assert "official DINOv2" in capsys.readouterr().out

"""``dinokit eval RUN_DIR``: the numbers a report needs, with baselines beside them.

kNN (k = 10, 20, 100, 200) and the linear probe on the run's frozen teacher features, the same
for a random network of the same architecture and a probe on raw (downsampled) pixels, all on the
run's own fixed split; predictions for the unlabelled test images in Kaggle's submission format.
Features are cached in ``RUN_DIR/eval/`` so probes re-run in seconds.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from dinokit import runs
from dinokit.data.har import Record
from dinokit.data.images import load_rgb
from dinokit.data.source import prepare_split, resolve_data_root
from dinokit.data.split import Split
from dinokit.device import device_kind, resolve_device
from dinokit.eval.failures import save_failures
from dinokit.eval.features import FEATURE_KINDS, extract_features
from dinokit.eval.jaccard import attention_jaccard, patch_grid_ceiling, pca_jaccard, silhouettes_of
from dinokit.eval.knn import knn_accuracy
from dinokit.eval.linear import linear_probe
from dinokit.eval.supervised import train_supervised
from dinokit.models.pretrained import load_timm_vit_weights, official_dinov2_state_dict
from dinokit.models.ssl import random_init_backbone
from dinokit.models.vit import VisionTransformer, build_vit
from dinokit.precision import choose_precision

log = logging.getLogger("dinokit.eval")
KNN_KS = (10, 20, 100, 200)


# The run or the data cannot be evaluated; the message says how to fix it (a missing, corrupt or
# mismatched checkpoint, data that is not the run's). One error type for all run-folder problems.
EvalError = runs.RunError


def _features(
    backbone: VisionTransformer,
    split: Split,
    size: int,
    cache: Path | None,
    device: torch.device,
    precision: str,
    kinds=FEATURE_KINDS,
) -> dict[str, dict]:
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=True)
    out = {}
    for part, records in (("train", split.train), ("val", split.val), ("test", split.unlabeled)):
        feats = extract_features(
            backbone, records, size, kinds=kinds, device=device, precision=precision, desc=f"features {part}"
        )
        out[part] = {"features": feats["features"], "labels": feats["labels"], "indices": feats["indices"]}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, cache)
    return out


def _probe_suite(
    feats: dict, n_classes: int, epochs: int, knn: bool = True, linear: bool = True
) -> tuple[dict, object | None]:
    train, val = feats["train"], feats["val"]
    metrics: dict = {}
    if knn:
        by_k = {
            f"k{k}": knn_accuracy(
                train["features"]["cls"], train["labels"], val["features"]["cls"], val["labels"], n_classes, k
            )
            for k in KNN_KS
        }
        metrics["knn"] = {"top1": by_k["k20"]["top1"], "top5": by_k["k20"]["top5"], "by_k": by_k}
    probe = None
    if linear:
        probe = linear_probe(
            train["features"], train["labels"], val["features"], val["labels"], n_classes, epochs=epochs
        )
        metrics["linear"] = {
            "top1": probe.top1,
            "top5": probe.top5,
            "balanced_accuracy": probe.balanced_accuracy,
            "feature": probe.feature,
            "lr": probe.lr,
            "selection_top1": probe.selection_top1,
        }
    return metrics, probe


def dinov2_reference(eval_size: int) -> tuple[VisionTransformer, int] | None:
    """The official DINOv2 ViT-S/14 as a reference ceiling, only when ``DINOKIT_DINOV2_WEIGHTS``
    points at local weights (evaluation never reaches for the network)."""
    if not os.environ.get("DINOKIT_DINOV2_WEIGHTS"):
        return None
    size = max(14, eval_size - eval_size % 14)
    model = build_vit("vit_small", patch_size=14, img_size=size, layerscale=1e-5)
    load_timm_vit_weights(model, official_dinov2_state_dict("vit_small"))
    return model.eval(), size


def pixel_baseline(split: Split, size: int = 16) -> dict:
    """Logistic regression on raw pixels downsampled to ``size`` x ``size`` (scikit-learn)."""

    def pixels(records: list[Record]) -> np.ndarray:
        rows = []
        for rec in records:
            img = load_rgb(rec.source).resize((size, size))
            rows.append(np.asarray(img, dtype=np.float32).reshape(-1) / 255.0)
        return np.stack(rows)

    x_train, x_val = pixels(split.train), pixels(split.val)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=300, C=0.1)
    clf.fit((x_train - mean) / std, [r.label for r in split.train])
    acc = 100.0 * clf.score((x_val - mean) / std, [r.label for r in split.val])
    return {"linear": {"top1": acc}, "input": f"{size}x{size} RGB pixels"}


SKIPPED = "skipped.json"  # in RUN_DIR/eval/: why a run has no classification results


def no_labels(run_dir: str | Path) -> str | None:
    """Why ``run_dir``'s data cannot be classified (written to ``eval/skipped.json``), or ``None`` when it can."""
    run_dir = Path(run_dir)
    split = prepare_split(runs.run_config(run_dir), progress=False)
    if split.val and len({r.label for r in split.val}) >= 2:
        (run_dir / "eval" / SKIPPED).unlink(missing_ok=True)
        return None
    why = (
        f"no classification: the data has {len(split.train) + len(split.val)} labelled images in "
        f"{len(split.classes)} classes (pre-training used its {len(split.unlabeled)} unlabelled images). kNN, the "
        "linear probe and predictions.csv need labels: give the data class folders or a Kaggle Training_set.csv"
    )
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / SKIPPED).write_text(json.dumps({"why": why}, indent=1) + "\n")
    return why


def evaluate_run(
    run_dir: str | Path,
    data_root: str | None = None,
    which: str = "teacher",
    probe_epochs: int = 100,
    baselines: bool = True,
    knn: bool = True,
    linear: bool = True,
    device: str | torch.device = "auto",
    supervised: bool | None = None,
    supervised_cap_s: float | None = None,
) -> dict:
    """Evaluate a run; writes ``RUN_DIR/eval/{metrics.json, per_class.csv, confusion.npy, predictions.csv}``.

    Features of the run, the random-init baseline and the DINOv2 reference are extracted on
    ``device`` (auto: CUDA when present) under autocast, then cached. ``supervised`` trains the
    supervised reference for the run's own training time (default: for runs with a time budget,
    such as the demo's; a GPU run of hours would take as long again), for at most ``supervised_cap_s``
    seconds when given (``capped`` and the run's own ``train_seconds_run`` are recorded beside its
    results). On data with silhouettes (the embedded dataset), the attention's Jaccard index is
    scored for every checkpoint.
    """
    run_dir = Path(run_dir)
    device = resolve_device(device)
    precision = choose_precision("auto", device_kind(device))
    if not (run_dir / runs.CHECKPOINT).is_file():
        raise EvalError(f"{run_dir} has no checkpoint.pt: train it first (`dinokit pretrain --out {run_dir}`)")
    if not (knn or linear):
        raise EvalError("nothing to evaluate: ask for --knn, --linear or both")
    cfg = runs.run_config(run_dir)
    if data_root:
        cfg.data.root = data_root
    start = time.perf_counter()
    split = prepare_split(cfg, progress=False)
    if len({r.label for r in split.val}) < 2:
        raise EvalError(f"{cfg.data.root or 'the data root'} has fewer than 2 labelled classes: nothing to classify")
    runs.check_data(run_dir, split.sha256, resolve_data_root(cfg))
    backbone = runs.load_backbone(run_dir, which)
    out_dir = run_dir / "eval"
    n_classes = len(split.classes)
    size = cfg.crops.eval_size
    iteration = runs.run_progress(run_dir)[0]  # in the cache key: a resumed run gets fresh features
    feature_files = {which: out_dir / f"features_{which}_{split.sha256[:12]}_it{iteration}.pt"}
    feats = _features(backbone, split, size, feature_files[which], device, precision)
    metrics, probe = _probe_suite(feats, n_classes, probe_epochs, knn, linear)
    metrics.update({"run": run_dir.name, "which": which, "split_sha256": split.sha256, "classes": split.classes})
    metrics["iteration"] = iteration  # of the checkpoint evaluated: a resumed run's results are stale
    metrics.update({"device": str(device), "precision": precision, "chance": 100.0 / n_classes})
    if baselines:
        feature_files["random_init"] = out_dir / f"features_random_{split.sha256[:12]}.pt"
        random_feats = _features(
            random_init_backbone(cfg), split, size, feature_files["random_init"], device, precision
        )
        metrics["baselines"] = {"random_init": _probe_suite(random_feats, n_classes, probe_epochs, knn, linear)[0]}
        if linear:
            metrics["baselines"]["pixels"] = pixel_baseline(split)
        reference = dinov2_reference(size)
        if reference is not None:
            model, ref_size = reference
            feature_files["dinov2_official"] = out_dir / f"features_dinov2_{split.sha256[:12]}_{ref_size}.pt"
            ref_feats = _features(model, split, ref_size, feature_files["dinov2_official"], device, precision)
            ref_metrics = _probe_suite(ref_feats, n_classes, probe_epochs, knn, linear)[0]
            metrics["baselines"]["dinov2_official"] = {**ref_metrics, "image_size": ref_size}
    info = runs.run_info(run_dir)
    if supervised is None:
        supervised = "time_budget" in info
    if baselines and supervised:
        seconds = float(info.get("train_seconds", 0.0))
        if seconds <= 0:
            raise EvalError(f"{run_dir} records no training time (run_info.json: train_seconds): train it to the end")
        capped = supervised_cap_s is not None and supervised_cap_s < seconds
        seconds = min(seconds, supervised_cap_s) if capped else seconds
        weights = out_dir / f"supervised_backbone_{split.sha256[:12]}_{seconds:.0f}s.pt"
        model = random_init_backbone(cfg)
        if weights.is_file():
            model.load_state_dict(runs.load_checkpoint(weights)["backbone"])
            stats = runs.load_checkpoint(weights)["stats"]
        else:
            log.info("supervised reference: the same network trained with labels for %.0f s", seconds)
            model, stats = train_supervised(cfg, split, seconds, device, precision)
            runs.save_atomic({"backbone": model.cpu().state_dict(), "stats": stats}, weights)
        feature_files["supervised"] = out_dir / f"features_supervised_{split.sha256[:12]}_{seconds:.0f}s.pt"
        sup_feats = _features(model.cpu(), split, size, feature_files["supervised"], device, precision)
        sup = _probe_suite(sup_feats, n_classes, probe_epochs, knn, linear)[0]
        run_s = info["train_seconds"]
        metrics["baselines"]["supervised"] = {**sup, **stats, "capped": capped, "train_seconds_run": run_s}
    silhouettes = silhouettes_of(resolve_data_root(cfg), split.val)
    if silhouettes is not None:
        with_supervised = "supervised" in metrics.get("baselines", {})
        metrics["attention_jaccard"] = jaccard_suite(run_dir, cfg, backbone, split, silhouettes, with_supervised)
    metrics["feature_files"] = {k: v.name for k, v in feature_files.items()}  # in RUN_DIR/eval/
    metrics["seconds"] = time.perf_counter() - start
    _write_outputs(out_dir, metrics, probe, split, feats)
    return metrics


def jaccard_suite(
    run_dir: Path,
    cfg,
    backbone,
    split: Split,
    silhouettes,
    with_supervised: bool = True,
    size: int | None = None,
) -> dict:
    """Jaccard (%) of the 60 %-mass CLS attention against the figure, best head (as DINO) and head
    average: the final teacher, random init, the supervised reference when asked for and trained,
    and every snapshot (when does the figure emerge?). ``size`` defaults to the run's attention size."""
    size = size or cfg.crops.attention_image_size
    score = lambda model: attention_jaccard(model, split.val, silhouettes, size)  # noqa: E731
    random_init = random_init_backbone(cfg)
    teacher, random = score(backbone), score(random_init)
    out = {
        "mass": 0.6,
        "images": len(split.val),
        "image_size": size,
        "geometry": "whole image resized to a square (as DINO's visualize_attention.py), no centre crop",
        "teacher": teacher["best"],
        "random_init": random["best"],
        "detail": {"teacher": teacher, "random_init": random},
        # the patch-PCA foreground (DINOv2 Fig. 1), scored against the same silhouettes
        "pca": {
            name: pca_jaccard(model, split.val, silhouettes, size)
            for name, model in (("teacher", backbone), ("random_init", random_init))
        },  # fmt: skip
        # the best any mask of whole patches can score here: the scale for the two above
        "patch_ceiling": patch_grid_ceiling(silhouettes, size, backbone.patch_size),
    }
    supervised = sorted((run_dir / "eval").glob(f"supervised_backbone_{split.sha256[:12]}_*.pt"))
    if with_supervised and supervised:
        model = random_init_backbone(cfg)
        model.load_state_dict(runs.load_checkpoint(supervised[-1])["backbone"])
        out["detail"]["supervised"] = score(model)
        out["supervised"] = out["detail"]["supervised"]["best"]
    container = random_init_backbone(cfg)
    out["snapshots"] = {}
    for path in sorted((run_dir / runs.SNAPSHOTS).glob("teacher_*.pt")):
        container.load_state_dict(runs.load_checkpoint(path))
        out["snapshots"][str(int(path.stem.split("_")[1]))] = score(container)["best"]
    return out


def _write_outputs(out_dir: Path, metrics: dict, probe, split: Split, feats: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if probe is None:  # kNN only: no probe, so no per-class table or predictions
        return
    np.save(out_dir / "confusion.npy", probe.confusion)
    with (out_dir / "per_class.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "images", "accuracy"])
        for c, name in enumerate(split.classes):
            writer.writerow([name, int(probe.confusion[c].sum()), f"{probe.per_class[c]:.2f}"])
    val_idx = feats["val"]["indices"].tolist()
    save_failures(out_dir, split, val_idx, probe.predictions, probe.confidence)
    with (out_dir / "val_predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label", "predicted", "confidence"])
        for i, pred, conf in zip(val_idx, probe.predictions, probe.confidence, strict=True):
            rec = split.val[i]
            writer.writerow([rec.name, split.classes[rec.label], split.classes[int(pred)], f"{conf:.4f}"])
    test = feats["test"]
    with (out_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])  # Kaggle's submission format
        if len(test["indices"]):
            preds = probe.predict(test["features"][probe.feature]).argmax(-1).tolist()
            for i, pred in zip(test["indices"].tolist(), preds, strict=True):
                writer.writerow([Path(split.unlabeled[i].name).name, split.classes[pred]])


def results_table(metrics: dict) -> str:
    def cell(m: dict, key: str, field: str = "top1") -> str:
        return f"{m[key][field]:.1f}%" if key in m else "-"

    rows = [("pre-trained " + metrics.get("which", "teacher"), metrics)]
    base = metrics.get("baselines", {})
    names = {
        "random_init": "random init (same arch)",
        "supervised": "supervised reference",
        "dinov2_official": "official DINOv2 ViT-S/14",
    }
    rows += [(label, base[key]) for key, label in names.items() if key in base]
    lines = [f"{'features':<26}{'kNN top-1':>10}{'linear top-1':>14}{'balanced':>10}"]
    for name, m in rows:
        lines.append(
            f"{name:<26}{cell(m, 'knn'):>10}{cell(m, 'linear'):>14}{cell(m, 'linear', 'balanced_accuracy'):>10}"
        )
    if "pixels" in base:
        lines.append(f"{'raw pixels 16x16':<26}{'-':>10}{base['pixels']['linear']['top1']:>13.1f}%{'-':>10}")
    lines.append(f"{'chance':<26}{metrics['chance']:>9.1f}%{metrics['chance']:>13.1f}%")
    jac = metrics.get("attention_jaccard")
    if jac:
        parts = [f"pre-trained {jac['teacher']:.1f}%", f"random init {jac['random_init']:.1f}%"]
        if "supervised" in jac:
            parts.append(f"supervised {jac['supervised']:.1f}%")
        lines.append(
            f"\nattention finds the figure (Jaccard of the best head, 60 % mass, {jac['images']} held-out images at "
            f"{jac['image_size']} px): " + ", ".join(parts)
        )
        if "pca" in jac:
            pca = jac["pca"]
            lines.append(
                f"patch-PCA foreground (groups of 8 images): pre-trained {pca['teacher']:.1f}%, "
                f"random init {pca['random_init']:.1f}%"
            )
        if "patch_ceiling" in jac:
            lines.append(f"best possible mask of whole patches (the ceiling of both): {jac['patch_ceiling']:.1f}%")
    return "\n".join(lines)

"""``make report`` / ``dinokit report``: the assignment's report, from saved artifacts only.

Reads a run folder (config, run info, metrics log, eval results, attention maps) and the
speed-study JSON under ``report/bench/``; writes ``report/figures/*.{png,pdf}``,
``report/report.md`` and a self-contained ``report/report.html``. The report has the sections the
assignment asks for (introduction, method, data and split, results, discussion); under each, a
block for the student's own text that rebuilding keeps (see :mod:`dinokit.viz.document`). It never
trains: a missing artifact turns its part into a note naming the command that makes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dinokit import paths  # noqa: E402
from dinokit.ablations import VARIANTS, ablation_dir, knn_curves  # noqa: E402
from dinokit.device import is_cpu_name  # noqa: E402
from dinokit.runs import CROPS_EXAMPLE, profile_run_dir, read_metrics, run_info  # noqa: E402
from dinokit.viz import plots  # noqa: E402
from dinokit.viz.attention_plots import attention_figure, jaccard_figure, pca_figure, snapshots_figure  # noqa: E402
from dinokit.viz.document import Document, bench_files_for, student_text, sweep_files  # noqa: E402

NOTEBOOKS = ("01_data_prep", "02_dino_loss_walkthrough", "03_dinov2_pretraining", "04_linear_evaluation",
             "05_flashattention_speed", "06_attention_maps")  # fmt: skip


def display_path(path: Path) -> str:
    """A path as the report shows it: relative to the project, never this machine's absolute path."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(paths.repo_root()))
    except ValueError:
        return path.name


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _pass_note(info: dict) -> str:
    """Say so when an "epoch" was not one pass over the data (``optim.epoch_length``)."""
    per_pass = info.get("iters_per_pass", info["iters_per_epoch"])
    return "" if per_pass == info["iters_per_epoch"] else f"; one pass over the data is {per_pass}"


def _method_section(r: Document, run_dir: Path) -> None:
    info = run_info(run_dir)
    if not info:
        r.missing("a pre-training run", f"dinokit pretrain --out {display_path(run_dir)}")
        return
    cfg = json.loads((run_dir / "config.json").read_text())
    m, c, o, lo = cfg["model"], cfg["crops"], cfg["optim"], cfg["loss"]
    r.p(
        "DINOv2 self-distillation: a student ViT learns to match an EMA teacher's distribution over prototypes "
        "for different crops of the same image (DINO loss on the CLS token), to predict the teacher's patch "
        "targets under masked patches (iBOT), while KoLeo spreads the features apart; the teacher's targets "
        f"are {lo['normalization']}-normalised and sharpened."
    )
    budget = info.get("time_budget")
    rows = [
        ["model", f"{m['arch']} / patch {m['patch_size']}, registers {m['n_registers']}"],
        ["attention", f"{m['attention']}: {info.get('attention_kernel', '?')}"],
        ["crops", f"2 x {c['global_size']} px + {c['n_local']} x {c['local_size']} px, augmented on the "
                  f"{info.get('augment_on', 'loader')}"],
        ["optimisation", f"{o['epochs']} epochs, batch {info['global_batch']}, base lr {o['base_lr']:g} "
                         f"({o['lr_scaling']}), teacher momentum {o['momentum_teacher']:g} -> 1"],
        ["iterations", f"{info['total_iters']} ({info['iters_per_epoch']} per epoch"
                       f"{_pass_note(info)}) on {info['n_pretrain_images']} images"],
        ["loss", f"DINO + iBOT (w {lo['ibot_weight']:g}) + KoLeo (w {lo['koleo_weight']:g}), "
                 f"{lo['normalization']}, teacher temperature {lo['warmup_teacher_temp']:g} -> {lo['teacher_temp']:g}"],
        ["device", f"{info.get('device_name', info['device'])}, {info['precision']}, torch {info['torch']}, "
                   f"{info['world_size']} process(es)"],
    ]  # fmt: skip
    if budget:
        rows.append(["time budget", budget["why"]])
    if "train_seconds" in info:
        rows.append(["training time", f"{info['train_seconds'] / 60:.1f} min (kNN checks and checkpoints included)"])
    r.table(["setting", "value"], rows)


def _data_section(r: Document, run_dir: Path) -> None:
    info = run_info(run_dir)
    if not info:
        r.missing("a pre-training run", f"dinokit pretrain --out {display_path(run_dir)}")
        return
    cfg = json.loads((run_dir / "config.json").read_text())
    counts = {"train": 0, "val": 0, "unlabeled": 0}
    by_class: dict[str, int] = {}  # labelled images (train + held-out)
    split_csv = run_dir / "split.csv"
    if split_csv.is_file():
        for line in split_csv.read_text().splitlines()[1:]:
            label, side = line.split(",")[1:3]
            counts[side] += 1
            if side != "unlabeled":
                by_class[label] = by_class.get(label, 0) + 1
    dataset = {"embedded": "the kit's embedded dataset", "har": "Kaggle Human Action Recognition (HAR)"}
    used = counts["unlabeled"] and cfg["data"]["use_unlabeled"]
    unlabeled = "the unlabelled test images too" if used else "no unlabelled images"
    r.p(
        f"Data: {dataset.get(info.get('dataset', ''), info.get('dataset', 'see run_info.json'))}; "
        f"{len(info['classes'])} classes. Fixed split (stratified, seed {cfg['data']['split_seed']}, "
        f"{int(100 * cfg['data']['val_fraction'])} % held out, exact duplicates on one side): train {counts['train']}, "
        f"held-out {counts['val']}, unlabelled {counts['unlabeled']}. Manifest sha256: `{info['split_sha256']}`."
    )
    labelled = counts["train"] + counts["val"]
    r.p(
        f"The {counts['unlabeled']:,} test-side images carry no labels, so they cannot measure accuracy: the held-out "
        f"set is carved out of the {labelled:,} labelled images instead"
        + (" (HAR's 12,600 labelled and 5,400 test images)" if info.get("dataset") == "har" else "")
        + f". This run pre-trained on {unlabeled} "
        f"(data.use_unlabeled {'on' if cfg['data']['use_unlabeled'] else 'off'}): where they take part, that is a "
        "transductive choice: the model has seen the images it will later be asked to label (never their labels, "
        "and never the held-out images). Discuss whether that is fair for your use."
    )
    if by_class:
        r.figure(plots.class_histogram(by_class, "labelled images per class (train + held-out)"), "class_histogram",
                 "Labelled images per class")  # fmt: skip
    crops = run_dir / CROPS_EXAMPLE
    if crops.is_file():
        views = torch.load(crops, weights_only=True)
        r.figure(
            plots.crops_figure(views), "crops", f"The multi-crop views of one pre-training image ({views['name']})"
        )


def _training_section(r: Document, run_dir: Path) -> None:
    r.h3("Training curves")
    metrics = read_metrics(run_dir)
    if not metrics:
        r.missing("the metrics log", f"dinokit pretrain --out {display_path(run_dir)}")
        return
    k = json.loads((run_dir / "config.json").read_text())["model"]["head_prototypes"]
    r.figure(plots.training_curves(metrics, k), "training_curves", "Loss terms, collapse monitor, schedules, kNN top-1")
    steps = [m for m in metrics if "images_per_s" in m]
    if steps:
        speed = float(np.median([m["images_per_s"] for m in steps]))
        wait = float(np.median([m.get("data_wait_share", 0.0) for m in steps]))
        r.p(f"Median training throughput: {speed:.0f} source images/s; {wait:.0%} of the step spent waiting for data.")
    _ablation_figure(r, (run_info(run_dir) or {}).get("preset", ""))


def _ablation_figure(r: Document, preset: str) -> None:
    """Notebook 03's ablations (short runs on the embedded data), where they have been trained."""
    short = "ci" if preset == "ci" else "cpu-demo"
    folders = {name: ablation_dir(short, name) for name in VARIANTS}
    done = {name: folder for name, folder in folders.items() if (folder / "metrics.jsonl").is_file()}
    curves = {name: points for name, points in knn_curves(done).items() if points}
    if not curves:
        r.p(f"No ablations trained yet: notebook 03's ablation cell trains them (`{short}` short runs).")
        return
    title = f"Ablations: kNN top-1 of `{short}` short runs on the embedded data, one piece switched off in each"
    r.figure(plots.ablation_curves(curves), "ablations", title)


def _eval_section(r: Document, run_dir: Path) -> None:
    r.h3("Classification on the held-out split")
    path, skipped = run_dir / "eval" / "metrics.json", run_dir / "eval" / "skipped.json"
    if not path.is_file() and skipped.is_file():
        r.p(json.loads(skipped.read_text())["why"] + ".")
        return
    if not path.is_file():
        r.missing("evaluation results", f"dinokit eval {display_path(run_dir)}")
        return
    m = json.loads(path.read_text())
    base = m.get("baselines", {})

    def row(name: str, x: dict) -> list[str]:
        linear = x.get("linear", {})
        knn = x.get("knn", {}).get("top1")
        return [name, _pct(knn), _pct(linear.get("top1")), _pct(linear.get("balanced_accuracy"))]

    rows = [row("pre-trained teacher", m)]
    names = {
        "random_init": "random init, same arch",
        "supervised": "supervised, same arch",
        "dinov2_official": "official DINOv2 ViT-S/14 (reference)",
    }
    rows += [row(label, base[key]) for key, label in names.items() if key in base]
    if "pixels" in base:
        rows.append(["raw pixels 16x16", "-", _pct(base["pixels"]["linear"]["top1"]), "-"])
    rows.append(["chance", _pct(m["chance"]), _pct(m["chance"]), _pct(m["chance"])])
    r.table(["features", "kNN top-1 (k=20)", "linear top-1", "linear balanced acc."], rows)
    if "linear" in m:
        r.p(f"Linear probe: {m['linear']['feature']} features, lr {m['linear']['lr']:g} (chosen on a part of train).")
    if "supervised" in base:
        sup = base["supervised"]
        r.p(
            f"The supervised reference trained the same network with labels for {sup['seconds'] / 60:.1f} min "
            f"({sup['images_seen']:,} images, {sup['steps']} steps)"
            + (f", capped (pre-training took {sup['train_seconds_run'] / 60:.1f} min)" if sup.get("capped") else "")
            + ": how much of what labels teach did self-supervision capture?"
        )
    metrics = read_metrics(run_dir)
    if any("knn_top1" in x for x in metrics) and "random_init" in base:
        baselines = {"random init": base["random_init"]["knn"]["top1"], "chance": m["chance"]}
        if "supervised" in base and "knn" in base["supervised"]:
            baselines["supervised reference"] = base["supervised"]["knn"]["top1"]
        r.figure(plots.knn_curve(metrics, baselines), "knn_curve", "kNN top-1 on the held-out split during training")
    predictions = run_dir / "eval" / "predictions.csv"
    if predictions.is_file():
        n = max(0, len(predictions.read_text().splitlines()) - 1)
        r.p(
            f"`{display_path(predictions)}` labels the {n:,} unlabelled test images with the linear probe, in the "
            "format of Kaggle's HAR submission (filename, label)."
            if n
            else f"`{display_path(predictions)}` is empty: this dataset has no unlabelled test images to label."
        )
    shown = {"teacher": "pre-trained", "random_init": "random init", "supervised": "supervised reference"}
    files = {k: run_dir / "eval" / f for k, f in m.get("feature_files", {}).items() if k in shown}
    if files and all(f.is_file() for f in files.values()):
        vals = {shown[k]: torch.load(f, weights_only=True)["val"] for k, f in files.items()}
        data = {k: (v["features"]["cls"].float().numpy(), v["labels"].numpy()) for k, v in vals.items()}
        r.figure(plots.feature_space(data, m["classes"]), "feature_space", "PCA of the held-out CLS features by class")
    failures = run_dir / "eval" / "failures.pt"
    if failures.is_file():
        f = torch.load(failures, weights_only=True)
        titles = [f"{t} → {p}\n{c:.0%}" for t, p, c in zip(f["true"], f["predicted"], f["confidence"], strict=True)]
        fig = plots.image_grid(list(f["images"].numpy()), titles, ncols=6, size=1.6)
        r.figure(fig, "failure_cases", "The held-out images the linear probe gets most confidently wrong (true → "
                 "predicted, the probe's probability)")  # fmt: skip
    per_class_csv, confusion = run_dir / "eval" / "per_class.csv", run_dir / "eval" / "confusion.npy"
    if per_class_csv.is_file() and confusion.is_file():
        import pandas as pd

        fig = plots.per_class_and_confusion(pd.read_csv(per_class_csv), np.load(confusion), m["classes"])
        r.figure(fig, "per_class_confusion", "Held-out accuracy per class and confusion matrix (linear probe)")


def _attention_section(r: Document, run_dir: Path) -> None:
    r.h3("Attention maps")
    eval_path = run_dir / "eval" / "metrics.json"
    jac = json.loads(eval_path.read_text()).get("attention_jaccard") if eval_path.is_file() else None
    if jac:
        ratio = jac["teacher"] / max(jac["random_init"], 1e-9)
        extra = f", supervised {jac['supervised']:.1f} %" if "supervised" in jac else ""
        r.p(
            "Does the CLS attention find the figure? Jaccard index between the 60 %-mass attention mask of the last "
            f"block and the figure's true silhouette, on {jac['images']} held-out images at "
            f"{jac.get('image_size', '?')} px ({jac.get('geometry', 'centre-cropped')}), for the best head of each "
            f"model (as DINO reports): pre-trained {jac['teacher']:.1f} % against "
            f"random init {jac['random_init']:.1f} % ({ratio:.2f}x){extra}."
        )
        r.figure(jaccard_figure(jac), "attention_jaccard", "Jaccard of attention and figure across checkpoints")
        if "pca" in jac:
            pca = jac["pca"]
            close = pca["random_init"] >= 0.9 * pca["teacher"]
            r.p(
                "The patch-PCA foreground (first component over 8 images at a time, each image's mean removed, "
                "thresholded at 0, sign chosen by the border) scored the same way: pre-trained "
                f"{pca['teacher']:.1f} % against random init {pca['random_init']:.1f} %."
                + (
                    " Random init comes this close because its features follow pixel intensity, and the embedded "
                    "figures are darker than their backgrounds: a mask that needs no learning."
                    if close and (run_info(run_dir) or {}).get("dataset") == "embedded"
                    else ""
                )
                + (
                    f" The PCA and attention masks are all made of whole patches: the best set of patches per image "
                    f"scores {jac['patch_ceiling']:.1f} % on these images, the most any of them could reach."
                    if "patch_ceiling" in jac
                    else ""
                )
            )
    path = run_dir / "attention" / "maps.pt"
    if not path.is_file():
        r.missing("attention maps", f"dinokit attention {display_path(run_dir)}")
        return
    data = torch.load(path, weights_only=True)
    grid = "x".join(str(s) for s in data["maps"].shape[-2:])
    r.figure(attention_figure(data), "attention_maps", f"CLS attention of the last block on held-out images ({grid})")
    if len(data["snapshots"]) > 1:
        r.figure(snapshots_figure(data), "attention_snapshots", "The same map across checkpoints")
    if "pca" in data:
        r.figure(pca_figure(data), "patch_pca", "PCA of patch features (DINOv2 Fig. 1 style): pre-trained vs random")


def _assignment_speed(r: Document, path: Path) -> None:
    """The assignment's two rows: this run's own training and testing, FlashAttention on vs off."""
    if not path.is_file():
        r.missing("this run's own training and testing speed, on vs off", "dinokit assignment (its speed stage)")
        return
    res = json.loads(path.read_text())
    rows = []
    for kind, label in (("train", "training step (this run's recipe, data included)"),
                        ("test", "testing: teacher over held-out + test images, loader included")):  # fmt: skip
        row = res.get(kind, {})
        on, off = row.get("on", {}), row.get("off", {})
        if not row.get("speedup"):
            rows.append([label, on.get("status", "-"), off.get("status", "-"), "-", "-", on.get("kernel", "-")])
            continue
        mem = f"{on['peak_mem_mb']:.0f} / {off['peak_mem_mb']:.0f}"
        rows.append([label, f"{on['images_per_s']:.1f}", f"{off['images_per_s']:.1f}", f"{row['speedup']:.2f}x",
                     mem, on["kernel"]])  # fmt: skip
        if row.get("model_alone_speedup"):
            alone = [f"{x['model_alone_images_per_s']:.1f}" for x in (on, off)]
            rows.append(["testing, model alone (images already decoded)", *alone,
                         f"{row['model_alone_speedup']:.2f}x", "", ""])  # fmt: skip
    memory = "peak RSS of the process, MB" if is_cpu_name(res["device"]) else "peak GPU memory, MB"
    r.p(f"This run's own speed (`{path.name}`): {res['device']}, torch {res['torch']}, "
        f"{res['train'].get('on', {}).get('iterations', '?')} timed training steps each way, "
        f"{res['rounds']} round(s)" + (", each measurement in a fresh process" if res.get("isolated") else "")
        + (", the order alternating between rounds." if res["rounds"] > 1 else "."))  # fmt: skip
    r.table(["what", "on, img/s", "off, img/s", "speed-up", f"{memory}, on / off", "kernel (on)"], rows)


def _bench_section(r: Document, bench_dir: Path, run_dir: Path) -> None:
    r.h3("FlashAttention on vs off")
    _assignment_speed(r, bench_dir / f"assignment-{run_dir.name}.json")
    r.p("The generic sweep (fixed shapes, where attention's share grows with the tokens):")
    files = sweep_files(bench_dir)
    info = run_info(run_dir) or {}
    device = info.get("device_name", "")
    chosen, others = bench_files_for(files, device, info.get("preset", "")) if device else (files, [])
    if others:
        r.p("Other speed results, for other devices or profiles: " + ", ".join(f"`{f.name}`" for f in others) + ".")
    if not chosen:
        r.missing(
            f"speed-study results on this run's device ({device or 'unknown'})",
            "dinokit bench (CPU) or bash benchmarks/gpu_speed_study.sh (GPU)",
        )
        return
    for f in chosen:
        rows = json.loads(f.read_text())
        device = rows[0]["device"] if rows else "?"
        r.p(f"`{f.name}`: {device}, torch {rows[0]['torch'] if rows else '?'}.")
        table = []
        for row in rows:
            speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
            kernel = row.get("extra", {}).get("attention_kernel", row["backend"])
            table.append([
                row["mode"], f"{row['arch']}/{row['patch']}", str(row["img_size"]), str(row["tokens"]),
                str(row["batch"]), row["dtype"], row["backend"], kernel, f"{row['images_per_s']:.2f}", speed,
                f"{row['peak_mem_mb']:.0f}", row["status"],
            ])  # fmt: skip
        header = ["mode", "model", "img", "tokens", "batch", "dtype", "backend", "kernel that ran", "img/s",
                  "speed-up", "peak MB", "status"]  # fmt: skip
        r.table(header, table)
        r.figure(plots.speedup_vs_tokens(rows, f"speed-up over naive ({device})"), f"bench_{f.stem}",
                 f"Speed-up and memory ratio, FlashAttention on vs off ({f.name})")  # fmt: skip


PROMPTS = {
    "introduction": "What problem does self-supervised pre-training solve, and why DINOv2? State what this report "
    "measures: held-out accuracy of frozen features, and the speed of FlashAttention on vs off.",
    "method": "Explain the objective in your own words: the DINO loss, centering or Sinkhorn-Knopp, iBOT, KoLeo, the "
    "EMA teacher and multi-crop (notebook 02). Which settings did you change from the defaults, and why?",
    "data": "Describe HAR and the fixed split (notebook 01). Is using the unlabelled test images in pre-training "
    "fair? What would change without them?",
    "results_accuracy": "Compare the pre-trained teacher with random init, raw pixels, chance and the supervised "
    "reference (notebook 04). Which classes are confused, and why might that be?",
    "results_attention": "What do the attention maps and the patch PCA show (notebook 06)? When in training does the "
    "figure emerge?",
    "results_speed": "How much faster is training and inference with FlashAttention, and where does the gain come "
    "from (notebook 05)? Why does it gain little, or even lose, at your run's few tokens per crop?",
    "discussion": "What worked, what did not, what you would try with more compute. Which ablation (notebook 03) "
    "surprised you?",
}


def build_report(
    run_dir: str | Path | None = None, out_dir: str | Path | None = None, bench_dir: str | Path | None = None
) -> Path:
    """Rebuild ``report/report.{md,html}`` and ``report/figures/`` from saved artifacts, keeping the
    student's text from the previous ``report.md``. Speed results come from ``bench_dir``
    (default ``report/bench/``)."""
    run_dir = Path(run_dir) if run_dir else profile_run_dir()
    out_dir = Path(out_dir) if out_dir else paths.report_dir()
    bench_dir = Path(bench_dir) if bench_dir else paths.report_dir() / "bench"
    r = Document(out_dir, student_text(out_dir / "report.md"))
    title = f"DINOv2 pre-training report: {run_dir.name}"
    r.p(
        f"Run folder: `{display_path(run_dir)}`. Every number and figure is read from saved artifacts and rebuilt "
        "by `make report`; the blue blocks are yours: write in them (in report.md) and rebuilding keeps your text."
    )
    executed = [(n, f"notebooks/{n}.html") for n in NOTEBOOKS if (out_dir / "notebooks" / f"{n}.html").is_file()]
    if executed:
        r.p("The notebooks, executed (`make notebooks`):")
        r.links(executed)
    r.h2("1. Introduction")
    r.student("introduction", PROMPTS["introduction"])
    r.h2("2. Method")
    _method_section(r, run_dir)
    r.student("method", PROMPTS["method"])
    r.h2("3. Dataset and split")
    _data_section(r, run_dir)
    r.student("data", PROMPTS["data"])
    r.h2("4. Results")
    _training_section(r, run_dir)
    _eval_section(r, run_dir)
    r.student("results_accuracy", PROMPTS["results_accuracy"])
    _attention_section(r, run_dir)
    r.student("results_attention", PROMPTS["results_attention"])
    _bench_section(r, bench_dir, run_dir)
    r.student("results_speed", PROMPTS["results_speed"])
    r.h2("5. Discussion")
    r.student("discussion", PROMPTS["discussion"])
    (out_dir / "report.md").write_text(r.markdown(title) + "\n")
    (out_dir / "report.html").write_text(r.html(title) + "\n")
    return out_dir / "report.html"

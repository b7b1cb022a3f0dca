"""``make report`` / ``dinokit report``: every figure and the report, from saved artifacts only.

Reads a run directory (config, run info, metrics log, eval results, attention maps) and the
speed-study JSON under ``report/bench/``; writes ``report/figures/*.{png,pdf}``,
``report/report.md`` and a self-contained ``report/report.html`` (figures embedded). It never
trains: a missing artifact turns its section into a note naming the command that makes it.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dinokit import paths  # noqa: E402
from dinokit.runs import profile_run_dir, read_metrics  # noqa: E402
from dinokit.viz import plots  # noqa: E402
from dinokit.viz.attention import head_overlay, mass_mask  # noqa: E402


@dataclass
class Block:
    kind: str  # "h2" | "p" | "table" | "figure" | "missing"
    content: object


class Report:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.fig_dir = out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.blocks: list[Block] = []

    def h2(self, text: str) -> None:
        self.blocks.append(Block("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def missing(self, what: str, command: str) -> None:
        self.blocks.append(Block("missing", (what, command)))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Block("table", (header, rows)))

    def figure(self, fig, name: str, caption: str) -> None:
        png, pdf = self.fig_dir / f"{name}.png", self.fig_dir / f"{name}.pdf"
        fig.savefig(png, dpi=110, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
        plt.close(fig)
        self.blocks.append(Block("figure", (name, caption)))

    def markdown(self, title: str) -> str:
        out = [f"# {title}", ""]
        for b in self.blocks:
            if b.kind == "h2":
                out += [f"## {b.content}", ""]
            elif b.kind == "p":
                out += [str(b.content), ""]
            elif b.kind == "missing":
                what, command = b.content
                out += [f"> **Missing:** {what}. Produce it with `{command}`.", ""]
            elif b.kind == "table":
                header, rows = b.content
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
            elif b.kind == "figure":
                name, caption = b.content
                out += [f"![{caption}](figures/{name}.png)", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;"
            "line-height:1.45}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}}img{{max-width:100%}}.missing{{background:#fff3cd;padding:.6em;border-left:4px solid "
            "#e0a800}}figcaption{{color:#555;font-style:italic}}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind == "h2":
                parts.append(f"<h2>{html.escape(str(b.content))}</h2>")
            elif b.kind == "p":
                parts.append(f"<p>{html.escape(str(b.content))}</p>")
            elif b.kind == "missing":
                what, command = b.content
                parts.append(
                    f"<p class='missing'><b>Missing:</b> {html.escape(what)}. "
                    f"Produce it with <code>{html.escape(command)}</code>.</p>"
                )
            elif b.kind == "table":
                header, rows = b.content
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for r in rows:
                    parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
                parts.append("</table>")
            elif b.kind == "figure":
                name, caption = b.content
                data = base64.b64encode((self.fig_dir / f"{name}.png").read_bytes()).decode()
                parts.append(
                    f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _data_section(r: Report, run_dir: Path) -> None:
    r.h2("Dataset and split")
    info_path = run_dir / "run_info.json"
    if not info_path.is_file():
        r.missing("a pre-training run", f"dinokit pretrain --out {run_dir}")
        return
    info = json.loads(info_path.read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    counts = {"train": 0, "val": 0, "unlabeled": 0}
    split_csv = run_dir / "split.csv"
    if split_csv.is_file():
        for line in split_csv.read_text().splitlines()[1:]:
            counts[line.split(",")[2]] += 1
    root = cfg["data"]["root"] or "the embedded dataset (or DINOKIT_DATA)"
    r.p(
        f"Data: {root}; {len(info['classes'])} classes. Fixed split (stratified, seed {cfg['data']['split_seed']}, "
        f"{int(100 * cfg['data']['val_fraction'])} % held out, exact duplicates on one side): train {counts['train']}, "
        f"held-out {counts['val']}, unlabelled {counts['unlabeled']}. Manifest sha256: {info['split_sha256']}."
    )
    r.h2("Training set-up")
    m, c, o = cfg["model"], cfg["crops"], cfg["optim"]
    r.table(
        ["setting", "value"],
        [
            [
                "model",
                f"{m['arch']} / patch {m['patch_size']}, registers {m['n_registers']}, attention {m['attention']}",
            ],
            ["crops", f"2 x {c['global_size']} px + {c['n_local']} x {c['local_size']} px"],
            [
                "optimisation",
                f"{o['epochs']} epochs, batch {info['global_batch']}, base lr {o['base_lr']:g} ({o['lr_scaling']})",
            ],
            [
                "iterations",
                f"{info['total_iters']} ({info['iters_per_epoch']} per epoch) on {info['n_pretrain_images']} images",
            ],
            [
                "loss",
                f"DINO + iBOT (w {cfg['loss']['ibot_weight']:g}) + KoLeo (w {cfg['loss']['koleo_weight']:g}), "
                f"{cfg['loss']['normalization']}",
            ],
            [
                "device",
                f"{info['device']}, {info['precision']}, torch {info['torch']}, {info['world_size']} process(es)",
            ],
        ],
    )


def _training_section(r: Report, run_dir: Path) -> list[dict]:
    r.h2("Training curves")
    metrics = read_metrics(run_dir)
    if not metrics:
        r.missing("the metrics log", f"dinokit pretrain --out {run_dir}")
        return []
    r.figure(plots.training_curves(metrics), "training_curves", "Loss terms, collapse monitor, schedules, kNN top-1")
    steps = [m for m in metrics if "images_per_s" in m]
    if steps:
        speed = float(np.median([m["images_per_s"] for m in steps]))
        r.p(f"Median training throughput: {speed:.0f} source images/s.")
    return metrics


def _eval_section(r: Report, run_dir: Path) -> None:
    r.h2("Classification on the held-out split")
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        r.missing("evaluation results", f"dinokit eval {run_dir}")
        return
    m = json.loads(path.read_text())
    base = m.get("baselines", {})

    def row(name: str, x: dict) -> list[str]:
        linear = x.get("linear", {})
        return [
            name,
            _pct(x.get("knn", {}).get("top1")),
            _pct(linear.get("top1")),
            _pct(linear.get("balanced_accuracy")),
        ]

    rows = [row("pre-trained teacher", m)]
    if "random_init" in base:
        rows.append(row("random init, same arch", base["random_init"]))
    if "dinov2_official" in base:
        rows.append(row("official DINOv2 ViT-S/14 (reference)", base["dinov2_official"]))
    if "pixels" in base:
        rows.append(["raw pixels 16x16", "-", _pct(base["pixels"]["linear"]["top1"]), "-"])
    rows.append(["chance", _pct(m["chance"]), _pct(m["chance"]), _pct(m["chance"])])
    r.table(["features", "kNN top-1 (k=20)", "linear top-1", "linear balanced acc."], rows)
    if "linear" in m:
        r.p(f"Linear probe: {m['linear']['feature']} features, lr {m['linear']['lr']:g} (chosen on a part of train).")
    per_class_csv = run_dir / "eval" / "per_class.csv"
    confusion = run_dir / "eval" / "confusion.npy"
    if per_class_csv.is_file() and confusion.is_file():
        import pandas as pd

        fig = plots.per_class_and_confusion(pd.read_csv(per_class_csv), np.load(confusion), m["classes"])
        r.figure(fig, "per_class_confusion", "Held-out accuracy per class and confusion matrix (linear probe)")


def _bench_section(r: Report, bench_dir: Path) -> None:
    r.h2("FlashAttention on vs off")
    files = sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else []
    if not files:
        r.missing("speed-study results", "dinokit bench (CPU) or bash benchmarks/gpu_speed_study.sh (GPU)")
        return
    for f in files:
        rows = json.loads(f.read_text())
        device = rows[0]["device"] if rows else "?"
        r.p(f"{f.name}: {device}, torch {rows[0]['torch'] if rows else '?'}.")
        table = []
        for row in rows:
            speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
            table.append([
                row["mode"], f"{row['arch']}/{row['patch']}", str(row["img_size"]), str(row["tokens"]),
                str(row["batch"]), row["dtype"], row["backend"], f"{row['images_per_s']:.2f}", speed,
                f"{row['peak_mem_mb']:.0f}", row["status"],
            ])  # fmt: skip
        header = [
            "mode",
            "model",
            "img",
            "tokens",
            "batch",
            "dtype",
            "backend",
            "img/s",
            "speed-up",
            "peak MB",
            "status",
        ]
        r.table(header, table)
        r.figure(plots.speedup_vs_tokens(rows, f"speed-up over naive ({device})"), f"bench_{f.stem}",
                 f"Speed-up and memory ratio, FlashAttention on vs off ({f.name})")  # fmt: skip


def attention_figure(data: dict, n: int = 6):
    """Per image: the image, the head-averaged CLS attention, its 60 % mass mask, per-head overlay."""
    images = data["images"][:n].permute(0, 2, 3, 1).float().numpy() / 255
    maps = data["maps"][:n]
    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    for i, img in enumerate(images):
        mean = maps[i].mean(0)
        panels = [img, mean.numpy(), mass_mask(mean[None], 0.6)[0].float().numpy(), head_overlay(img, maps[i])]
        for j, (ax, panel) in enumerate(zip(axes[i], panels, strict=True)):
            ax.imshow(panel, cmap=None if j in (0, 3) else "inferno")
            ax.axis("off")
        axes[i, 0].set_title(data["labels"][i], fontsize=8)
    for ax, title in zip(axes[0, 1:], ("mean over heads", "60 % mass", "heads (colours)"), strict=True):
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def snapshots_figure(data: dict, image: int = 0):
    """How one image's head-averaged CLS attention sharpens across checkpoints."""
    snaps = data["snapshots"]
    fig, axes = plt.subplots(1, len(snaps) + 1, figsize=(1.8 * (len(snaps) + 1), 2.2), squeeze=False)
    axes[0, 0].imshow(data["images"][image].permute(1, 2, 0).numpy())
    axes[0, 0].set_title(data["labels"][image], fontsize=8)
    for ax, (it, maps) in zip(axes[0, 1:], snaps.items(), strict=True):
        ax.imshow(maps[image].mean(0).numpy(), cmap="inferno")
        ax.set_title("random init" if it == "0" else f"iter {int(it)}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _attention_section(r: Report, run_dir: Path) -> None:
    r.h2("Attention maps")
    path = run_dir / "attention" / "maps.pt"
    if not path.is_file():
        r.missing("attention maps", f"dinokit attention {run_dir}")
        return
    data = torch.load(path, weights_only=True)
    r.figure(attention_figure(data), "attention_maps", "CLS attention of the last block on held-out images")
    if len(data["snapshots"]) > 1:
        r.figure(snapshots_figure(data), "attention_snapshots", "The same map across checkpoints")


def build_report(run_dir: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """Rebuild ``report/report.{md,html}`` and ``report/figures/`` from saved artifacts."""
    run_dir = Path(run_dir) if run_dir else profile_run_dir()
    out_dir = Path(out_dir) if out_dir else paths.report_dir()
    r = Report(out_dir)
    title = f"DINOv2 pre-training report: {run_dir.name}"
    r.p(f"Run directory: {run_dir}. Every number and figure below is read from saved artifacts.")
    _data_section(r, run_dir)
    _training_section(r, run_dir)
    _eval_section(r, run_dir)
    _bench_section(r, out_dir / "bench")
    _attention_section(r, run_dir)
    (out_dir / "report.md").write_text(r.markdown(title) + "\n")
    (out_dir / "report.html").write_text(r.html(title) + "\n")
    return out_dir / "report.html"

"""Matplotlib figures for the notebooks and the report; each takes data, returns a Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from dinokit.data.crops import denormalize
from dinokit.device import is_cpu_name


def class_histogram(counts: Mapping[str, int], title: str = "images per class") -> Figure:
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(counts)), 3.2))
    names = [n for n, c in counts.items() if c]
    ax.bar(range(len(names)), [counts[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_ylabel("images")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def image_grid(images: Sequence, titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.4) -> Figure:
    """PIL images or CHW tensors (normalised tensors are shown as the model sees them)."""
    nrows = max(1, int(np.ceil(len(images) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        if isinstance(img, torch.Tensor):
            img = denormalize(img).permute(1, 2, 0).numpy()
        ax.imshow(img)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def size_distribution(sizes: Sequence[tuple[int, int]]) -> Figure:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    w, h = np.array(sizes).T if len(sizes) else (np.array([]), np.array([]))
    ax.scatter(w, h, s=6, alpha=0.4)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"image sizes ({len(sizes)} images)")
    fig.tight_layout()
    return fig


def crops_figure(views: Mapping[str, Sequence[torch.Tensor]]) -> Figure:
    """The 2 global and N local crops of one image, each at its own resolution."""
    n_global, n_local = len(views["global"]), len(views["local"])
    fig = plt.figure(figsize=(2.2 * n_global + 1.2 * n_local, 2.6))
    widths = [2.0] * n_global + [1.0] * n_local
    grid = fig.add_gridspec(1, n_global + n_local, width_ratios=widths)
    for i, view in enumerate(list(views["global"]) + list(views["local"])):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(denormalize(view).permute(1, 2, 0).numpy())
        kind = "global" if i < n_global else "local"
        ax.set_title(f"{kind} {view.shape[-1]}px", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def masks_figure(masks: torch.Tensor, grid: tuple[int, int], ncols: int = 8) -> Figure:
    n = masks.shape[0]
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 1.2, nrows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        m = masks[i].reshape(grid).float().numpy()
        axes.flat[i].imshow(m, cmap="gray_r", vmin=0, vmax=1)
        axes.flat[i].set_title(f"{100 * m.mean():.0f}%", fontsize=7)
    fig.suptitle("iBOT masks (black: masked patches)", fontsize=9)
    fig.tight_layout()
    return fig


def _series(metrics: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(m["iteration"], m[key]) for m in metrics if key in m]
    if not rows:
        return np.array([]), np.array([])
    x, y = np.array(rows, dtype=float).T
    return x, y


def training_curves(metrics: Sequence[Mapping], n_prototypes: int | None = None) -> Figure:
    """Loss terms, collapse monitor (with log K, the value either monitor reaches at collapse, when
    ``n_prototypes`` is given), schedules and kNN accuracy of one run, from metrics.jsonl."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for key in ("loss_dino", "loss_ibot", "loss_koleo"):
        x, y = _series(metrics, key)
        if len(x):
            axes[0].plot(x, y, label=key.removeprefix("loss_"))
    axes[0].set_title("loss terms")
    axes[0].legend(fontsize=8)
    for key, label in (("teacher_entropy", "entropy of targets"), ("teacher_kl_uniform", "KL(mean target ‖ uniform)")):
        x, y = _series(metrics, key)
        axes[1].plot(x, y, label=label)
    if n_prototypes:
        axes[1].axhline(np.log(n_prototypes), color="gray", linestyle=":", label=f"log K (K = {n_prototypes})")
    axes[1].set_title("collapse monitor (nats)")
    axes[1].legend(fontsize=8)
    x, lr = _series(metrics, "lr")
    axes[2].plot(x, lr, color="tab:red", label="lr")
    axes[2].set_ylabel("lr", color="tab:red")
    twin = axes[2].twinx()
    xm, m = _series(metrics, "momentum")
    twin.plot(xm, m, color="tab:green", label="teacher momentum")
    twin.set_ylabel("teacher momentum", color="tab:green")
    axes[2].set_title("schedules")
    xk, k = _series(metrics, "knn_top1")
    axes[3].plot(xk, k, marker="o", label="pre-trained teacher")
    axes[3].set_title("kNN top-1 on the held-out split (%)")
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    return fig


def knn_curve(metrics: Sequence[Mapping], baselines: Mapping[str, float] | None = None) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    x, y = _series(metrics, "knn_top1")
    ax.plot(x, y, marker="o", label="pre-trained teacher")
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{i + 1}", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("kNN top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def toy_histories(histories: Mapping[str, Mapping[str, Sequence[float]]], log_k: float) -> Figure:
    """Entropy and KL-to-uniform over training for several toy DINO settings."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for name, hist in histories.items():
        axes[0].plot(hist["entropy"], label=name)
        axes[1].plot(hist["kl_uniform"], label=name)
    for ax, title in zip(axes, ("entropy of teacher targets", "KL(mean target ‖ uniform)"), strict=True):
        ax.axhline(log_k, color="gray", linestyle=":", label="log K")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speedup_vs_tokens(rows: Sequence[Mapping], title: str = "FlashAttention speed-up over naive attention") -> Figure:
    """Speed-up (and memory ratio where measured) against the number of tokens.

    One line per (mode, backend, dtype); each point is labelled with its batch size where a line
    mixes batch sizes, because on a CPU the naive path's cost depends on the batch too. Where every
    comparison has one shape only, a line would be a lone point: bars instead.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        if r.get("speedup") and r.get("backend", "sdpa") != "naive":
            key = (r.get("mode", "attention op"), r.get("backend", "sdpa"), r.get("dtype", "fp32"))
            groups.setdefault(key, []).append(r)
    single_shape = all(len({(r["tokens"], r.get("batch", 1)) for r in g}) == 1 for g in groups.values())
    if single_shape:
        _speedup_bars(axes, groups)
    else:
        _speedup_lines(axes, groups)
    axes[0].axhline(1.0, color="gray", linestyle=":")
    axes[0].set_ylabel("speed-up (x)")
    axes[1].set_ylabel("peak memory, on / off")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    devices = {r.get("device", "") for r in rows}
    on_cpu = bool(devices) and all(is_cpu_name(d) for d in devices)
    axes[0].set_title(title, fontsize=10)
    memory = "CPU: peak RSS of the whole process" if on_cpu else "GPU: peak allocated memory"
    axes[1].set_title(f"memory ratio ({memory})", fontsize=10)
    fig.tight_layout()
    return fig


def _speedup_lines(axes, groups: dict[tuple, list[Mapping]]) -> None:
    for (mode, backend, dtype), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: (r["tokens"], r.get("batch", 1)))
        label = f"{mode} · {backend} · {dtype}"
        several_batches = len({r.get("batch", 1) for r in group}) > 1
        for ax, key in ((axes[0], "speedup"), (axes[1], "memory_ratio")):
            pts = [r for r in group if r.get(key)]
            if not pts:
                continue
            (line,) = ax.plot([r["tokens"] for r in pts], [r[key] for r in pts], marker="o", label=label)
            if several_batches:
                for r in pts:
                    ax.annotate(f"b{r.get('batch', 1)}", (r["tokens"], r[key]), xytext=(4, 2),
                                textcoords="offset points", fontsize=7, color=line.get_color())  # fmt: skip
    for ax in axes:
        ax.set_xlabel("tokens per image")
        ax.set_xscale("log")


def _speedup_bars(axes, groups: dict[tuple, list[Mapping]]) -> None:
    """One bar per (mode, backend, dtype), each at its single shape."""
    keys = sorted(groups)
    labels = [f"{mode}\n{backend} · {dtype}\n{groups[k][0]['tokens']} tok, b{groups[k][0].get('batch', 1)}"
              for k in keys for mode, backend, dtype in [k]]  # fmt: skip
    for ax, key in ((axes[0], "speedup"), (axes[1], "memory_ratio")):
        values = [groups[k][0].get(key) or float("nan") for k in keys]  # unmeasured: no bar, never a 0
        ax.bar(range(len(keys)), values, color="#4c72b0")
        ax.set_xticks(range(len(keys)), labels, fontsize=7)


def feature_space(features: Mapping[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str]) -> Figure:
    """PCA of held-out CLS features, one panel per model (``{title: (features (N, D), labels (N,))}``),
    coloured by class: classes that form their own clouds are the ones a linear probe separates."""
    from sklearn.decomposition import PCA

    fig, axes = plt.subplots(1, len(features), figsize=(5.2 * len(features), 4.6), squeeze=False)
    for ax, (title, (x, labels)) in zip(axes[0], features.items(), strict=False):
        pca = PCA(n_components=2).fit(x)
        xy = pca.transform(x)
        for c, name in enumerate(classes):
            ax.scatter(xy[labels == c, 0], xy[labels == c, 1], s=6, color=plt.cm.tab20(c % 20), label=name)
        ax.set_xlabel(f"PC 1 ({100 * pca.explained_variance_ratio_[0]:.0f} % of variance)")
        ax.set_ylabel(f"PC 2 ({100 * pca.explained_variance_ratio_[1]:.0f} % of variance)")
        ax.set_title(f"{title}: held-out CLS features")
    axes[0, -1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    fig.tight_layout()
    return fig


def per_class_and_confusion(per_class, confusion: np.ndarray, classes: Sequence[str]) -> Figure:
    """Held-out accuracy per class (bars) and the row-normalised confusion matrix."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    axes[0].barh(list(per_class["class"]), list(per_class["accuracy"]), color="tab:blue")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("held-out accuracy (%)")
    rows = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    ConfusionMatrixDisplay(normalised, display_labels=list(classes)).plot(
        ax=axes[1], cmap="Blues", colorbar=True, values_format=".1f", xticks_rotation=60,
        include_values=len(classes) <= 10,  # beyond that the numbers overlap; the colours carry it
    )  # fmt: skip
    axes[1].set_title("confusion (rows: true class, normalised)")
    fig.tight_layout()
    return fig


def ablation_curves(curves: Mapping[str, Sequence[tuple[int, float]]], baselines: Mapping[str, float] | None = None):
    """kNN top-1 over training for several variants of one short run, on one plot."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, points) in enumerate(curves.items()):
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="o", markersize=3, color=f"C{i}", label=name, linewidth=2.5 if i == 0 else 1.5)
    for j, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle=":", color="gray" if j else "black", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("kNN top-1 on the held-out split (%)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig

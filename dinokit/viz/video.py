"""``make video`` / ``dinokit video``: a one-minute demo video built from saved artifacts.

Scenes: title, the dataset, the crops the model sees, training curves unfolding, attention maps
sharpening across checkpoints, the speed study, the final results. H.264 MP4 through
imageio-ffmpeg (which ships its own ffmpeg); a GIF when that is not available. A scene whose
artifact is missing becomes a card that says which command makes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dinokit import paths  # noqa: E402
from dinokit.runs import profile_run_dir, read_metrics, run_info  # noqa: E402
from dinokit.viz.document import bench_files_for, sweep_files  # noqa: E402

FPS = 5
SIZE = (9.6, 5.44)  # inches at 100 dpi: 960 x 544, a multiple of 16 for H.264


def _render(fig) -> np.ndarray:
    fig.set_size_inches(*SIZE)
    fig.set_dpi(100)
    fig.canvas.draw()
    frame = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return frame


def _own_speed_lines(res: dict) -> list[str]:
    """This run's own training and testing, on vs off (the assignment's two rows)."""
    out = []
    for kind, label in (("train", "this run's training"), ("test", "this run's testing")):
        row = res.get(kind, {})
        if row.get("speedup"):
            out.append(f"{label}: {row['on']['images_per_s']:.0f} vs {row['off']['images_per_s']:.0f} img/s, "
                       f"{row['speedup']:.2f}x ({res['device'][:24]})")  # fmt: skip
    return out


def _card(title: str, lines: list[str] = ()) -> np.ndarray:
    fig = plt.figure(figsize=SIZE)
    fig.text(0.5, 0.62, title, ha="center", va="center", fontsize=26, weight="bold")
    for i, line in enumerate(lines):
        fig.text(0.5, 0.45 - 0.07 * i, line, ha="center", va="center", fontsize=14)
    return _render(fig)


def _hold(frame: np.ndarray, seconds: float) -> Iterator[np.ndarray]:
    for _ in range(max(1, int(seconds * FPS))):
        yield frame


def _grid(images: torch.Tensor, titles: list[str], heading: str) -> np.ndarray:
    n = len(images)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=SIZE, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=10)
    fig.suptitle(heading, fontsize=16)
    return _render(fig)


def _curves(metrics: list[dict], upto: int) -> np.ndarray:
    steps = [m for m in metrics if "loss_dino" in m and m["iteration"] <= upto]
    knn = [m for m in metrics if "knn_top1" in m and m["iteration"] <= upto]
    total = max(m["iteration"] for m in metrics)
    fig, axes = plt.subplots(1, 2, figsize=SIZE)
    for key in ("loss_dino", "loss_ibot"):
        axes[0].plot([m["iteration"] for m in steps], [m.get(key, np.nan) for m in steps], label=key[5:])
    axes[0].set_xlim(0, total)
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot([m["iteration"] for m in knn], [m["knn_top1"] for m in knn], marker="o")
    axes[1].set_xlim(0, total)
    axes[1].set_ylim(0, max([m["knn_top1"] for m in metrics if "knn_top1" in m] + [10]) * 1.15)
    axes[1].set_title("kNN top-1 on held-out images (%)")
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.suptitle(f"pre-training: iteration {upto} of {total}", fontsize=14)
    return _render(fig)


def _frames(run_dir: Path, report_dir: Path) -> Iterator[np.ndarray]:
    yield from _hold(_card("DINOv2, from scratch", ["self-supervised ViT pre-training", f"run: {run_dir.name}"]), 4)
    att_path = run_dir / "attention" / "maps.pt"
    att = torch.load(att_path, weights_only=True) if att_path.is_file() else None
    if att is not None:
        yield from _hold(_grid(att["images"][:8], att["labels"][:8], "held-out images (never seen in training)"), 6)
        from dinokit.data.crops import MultiCrop, denormalize

        cfg = json.loads((run_dir / "config.json").read_text())["crops"]
        from PIL import Image

        image = Image.fromarray(att["images"][0].permute(1, 2, 0).numpy())
        torch.manual_seed(0)
        views = MultiCrop(cfg["global_size"], cfg["local_size"], cfg["n_local"])(image)
        crops = [denormalize(v) for v in views["global"] + views["local"]]
        titles = ["global"] * len(views["global"]) + ["local"] * len(views["local"])
        yield from _hold(_grid(torch.stack([torch.nn.functional.interpolate(c[None], size=64)[0] for c in crops]),
                               titles, "the crops the student and teacher see"), 6)  # fmt: skip
    else:
        yield from _hold(_card("dataset and crops", ["missing: run `dinokit attention RUN_DIR`"]), 4)
    metrics = read_metrics(run_dir)
    if metrics:
        total = max(m["iteration"] for m in metrics)
        for upto in np.linspace(total / 30, total, 30).astype(int):
            yield from _hold(_curves(metrics, int(upto)), 0.4)
        yield from _hold(_curves(metrics, total), 3)
    else:
        yield from _hold(_card("training", ["missing: run `dinokit pretrain`"]), 4)
    if att is not None and len(att["snapshots"]) > 1:
        from dinokit.viz.attention_plots import snapshots_figure

        for i in range(min(4, len(att["images"]))):
            fig = snapshots_figure(att, image=i)
            fig.suptitle("CLS attention sharpening across checkpoints", fontsize=14)
            yield from _hold(_render(fig), 3)
    bench = sweep_files(report_dir / "bench")
    own = report_dir / "bench" / f"assignment-{run_dir.name}.json"
    info = run_info(run_dir) or {}
    if info.get("device_name"):  # this run's device and profile only, as the report
        bench = bench_files_for(bench, info["device_name"], info.get("preset", ""))[0]
    lines = _own_speed_lines(json.loads(own.read_text())) if own.is_file() else []
    if bench or lines:
        rows = [r for f in bench for r in json.loads(f.read_text()) if r.get("speedup") and r["backend"] != "naive"]
        names = {"sdpa": "FlashAttention (SDPA)", "timm-fused": "timm's fused ViT", "flash-attn": "flash-attn",
                 "sdpa-efficient": "memory-efficient"}  # fmt: skip
        lines += [f"{r['mode']} {r['arch'].replace('vit_', 'ViT-')}/{r['patch']} @{r['img_size']} px, "
                  f"{names.get(r['backend'], r['backend'])}: {r['speedup']:.2f}x over naive ({r['device'][:24]})"
                  for r in rows[: 6 - len(lines)]]  # fmt: skip
        yield from _hold(_card("FlashAttention on vs off", lines or ["no speed-ups recorded"]), 8)
    else:
        yield from _hold(_card("FlashAttention on vs off", ["missing: run `dinokit bench`"]), 4)
    eval_path = run_dir / "eval" / "metrics.json"
    if eval_path.is_file():
        m = json.loads(eval_path.read_text())
        b = m.get("baselines", {})
        lines = [f"pre-trained: kNN {m['knn']['top1']:.1f}%, linear {m['linear']['top1']:.1f}%"]
        if "random_init" in b:
            lines.append(f"random init: kNN {b['random_init']['knn']['top1']:.1f}%, "
                         f"linear {b['random_init']['linear']['top1']:.1f}%")  # fmt: skip
        if "supervised" in b:
            lines.append(f"supervised reference: kNN {b['supervised']['knn']['top1']:.1f}%, "
                         f"linear {b['supervised']['linear']['top1']:.1f}%")  # fmt: skip
        if "pixels" in b:
            lines.append(f"raw pixels: linear {b['pixels']['linear']['top1']:.1f}%")
        lines.append(f"chance: {m['chance']:.1f}%")
        yield from _hold(_card("held-out classification", lines), 8)
        jac = m.get("attention_jaccard")
        if jac:
            from dinokit.viz.attention_plots import jaccard_figure

            fig = jaccard_figure(jac)
            fig.suptitle(f"attention finds the figure: Jaccard {jac['teacher']:.0f}% vs random init "
                         f"{jac['random_init']:.0f}%", fontsize=13)  # fmt: skip
            yield from _hold(_render(fig), 5)
    else:
        yield from _hold(_card("held-out classification", ["missing: run `dinokit eval RUN_DIR`"]), 4)


def build_video(run_dir: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the demo video; returns its path (``.mp4``, or ``.gif`` if ffmpeg is unavailable)."""
    run_dir = Path(run_dir) if run_dir else profile_run_dir()
    report_dir = paths.report_dir()
    out = Path(out) if out else report_dir / "demo.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    import imageio.v2 as imageio

    frames = list(_frames(run_dir, report_dir))
    try:
        with imageio.get_writer(out, fps=FPS, codec="libx264", quality=7, pixelformat="yuv420p") as writer:
            for frame in frames:
                writer.append_data(frame)
        return out
    except (ImportError, RuntimeError, OSError):
        gif = out.with_suffix(".gif")
        imageio.mimsave(gif, [f[::2, ::2] for f in frames], duration=1 / FPS)
        return gif


def probe(path: str | Path) -> dict:
    """Duration and frame count of a video, read back with imageio-ffmpeg's own ffprobe-like reader."""
    import imageio_ffmpeg

    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    return {"frames": frames, "seconds": seconds}

"""The embedded default dataset: procedurally drawn people in action poses, made offline.

Each class is a pose (joint angles of a stick figure with thick limbs and a head), jittered per
image and drawn at a random position, scale, orientation and brightness on a background with a few
soft random shapes; the figure's brightness contrasts with it. Colours come from a small shared
palette at low saturation, so colour neither tells the class nor identifies an image (two crops
of one image cannot be matched by colour alone, a shortcut for self-supervised learning). A
model has to see the figure's shape, which is what self-supervised learning must discover.
Written in the Kaggle HAR layout (``Training_set.csv``, ``train/``, ``Testing_set.csv``,
``test/``) so the real reader is used, with a few exact duplicates as HAR has. Beside it,
``silhouettes/{train,test}/<name>.png`` hold each figure's mask: the ground truth for "does the
CLS attention find the figure?" (Jaccard index, as DINO measures on PASCAL VOC).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# Joint angles in degrees, measured from "straight down", positive towards the figure's front.
# Keys: torso tilt (from vertical), upper arms / forearms / thighs / shins (absolute angles),
# and a whole-body rotation (lying down).
POSES: dict[str, dict[str, float]] = {
    "standing": dict(torso=0, ua1=10, fa1=5, ua2=-10, fa2=-5, th1=6, sh1=3, th2=-6, sh2=-3),
    "walking": dict(torso=3, ua1=30, fa1=50, ua2=-30, fa2=-15, th1=25, sh1=5, th2=-22, sh2=-38),
    "running": dict(torso=20, ua1=-50, fa1=40, ua2=60, fa2=140, th1=70, sh1=-10, th2=-40, sh2=-100),
    "jumping": dict(torso=0, ua1=125, fa1=135, ua2=-125, fa2=-135, th1=32, sh1=38, th2=-32, sh2=-38),
    "cheering": dict(torso=0, ua1=152, fa1=158, ua2=-152, fa2=-158, th1=4, sh1=2, th2=-4, sh2=-2),
    "waving": dict(torso=0, ua1=100, fa1=170, ua2=-10, fa2=-5, th1=6, sh1=3, th2=-6, sh2=-3),
    "sitting": dict(torso=-5, ua1=25, fa1=85, ua2=20, fa2=80, th1=90, sh1=0, th2=85, sh2=-5),
    "sleeping": dict(torso=0, ua1=10, fa1=10, ua2=-5, fa2=-5, th1=3, sh1=3, th2=-3, sh2=-3, body=90),
    "kicking": dict(torso=-10, ua1=-70, fa1=-80, ua2=75, fa2=85, th1=88, sh1=85, th2=-3, sh2=-3),
    "bending": dict(torso=80, ua1=0, fa1=5, ua2=10, fa2=15, th1=-5, sh1=-3, th2=5, sh2=3),
    "calling": dict(torso=0, ua1=105, fa1=-160, ua2=-10, fa2=-5, th1=6, sh1=3, th2=-6, sh2=-3),
    "pointing": dict(torso=0, ua1=90, fa1=90, ua2=-10, fa2=-5, th1=6, sh1=3, th2=-6, sh2=-3),
}
CLASSES = list(POSES)
GENERATOR_VERSION = 3  # bump when drawing changes, so cached datasets are redrawn
SILHOUETTES = "silhouettes"


def silhouette_name(image_name: str) -> str:
    return Path(image_name).with_suffix(".png").name


def silhouette_path(root: str | Path, record_name: str) -> Path:
    """Where the embedded dataset keeps the silhouette of the image ``record_name`` (``train/x.jpg``)."""
    part, name = record_name.split("/", 1)
    return Path(root) / SILHOUETTES / part / silhouette_name(name)


def _vec(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([math.sin(a), math.cos(a)])


# A small shared palette at low saturation: colour must not identify an image, or two crops of
# one image can be matched by their colours alone (a shortcut that teaches nothing about pose).
PALETTE = [(110, 110, 110), (128, 118, 100), (100, 112, 128), (118, 128, 108), (126, 106, 118), (96, 120, 120)]


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A palette colour at a random brightness (brightness is what colour jitter changes most)."""
    base = np.array(PALETTE[rng.integers(len(PALETTE))], dtype=float)
    return tuple(int(c) for c in np.clip(base * rng.uniform(0.5, 1.8), 0, 255))


def _background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Backgrounds from a narrow band of mid greys with a faint palette tint: two images' backgrounds
    look alike, so matching two crops by their background (a shortcut) does not work."""
    base = np.array(PALETTE[rng.integers(len(PALETTE))], dtype=float)
    return tuple(int(c) for c in np.clip(base * rng.uniform(1.05, 1.35), 0, 255))


def _draw_background(img: Image.Image, rng: np.random.Generator) -> None:
    """A soft gradient with a few faint shapes: clutter that is visible but clearly weaker than the
    figure, so that crops of background do not outweigh the figure's shape."""
    size = img.width
    draw = ImageDraw.Draw(img)
    top, bottom = np.array(_background_colour(rng)), np.array(_background_colour(rng))
    for y in range(size):
        t = y / max(size - 1, 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(c) for c in (1 - t) * top + t * bottom))
    clutter = Image.new("RGB", img.size)
    mask = Image.new("L", img.size, 0)
    cd, md = ImageDraw.Draw(clutter), ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.5, 2) * size
        box = [x0, y0, x0 + w, y0 + h]
        shape = cd.rectangle if rng.random() < 0.5 else cd.ellipse
        shape(box, fill=_background_colour(rng))
        (md.rectangle if shape == cd.rectangle else md.ellipse)(box, fill=int(rng.uniform(40, 90)))
    img.paste(clutter, mask=mask)


def _contrasting_colour(background: Image.Image, rng: np.random.Generator) -> tuple[int, int, int]:
    """A palette colour whose brightness is far from the background's, so the figure stands out."""
    luminance = float(np.asarray(background.convert("L"), dtype=np.float32).mean())
    colour = np.array(PALETTE[rng.integers(len(PALETTE))], dtype=float)
    target = rng.uniform(15, 55) if luminance > 110 else rng.uniform(200, 240)
    return tuple(int(c) for c in np.clip(colour * target / colour.mean(), 0, 255))


def draw_person(pose: str, size: int, rng: np.random.Generator, scale: int = 2) -> Image.Image:
    """Draw one image of class ``pose`` (rendered at ``scale``x then downsampled: anti-aliasing)."""
    return draw_person_with_mask(pose, size, rng, scale)[0]


def draw_person_with_mask(
    pose: str, size: int, rng: np.random.Generator, scale: int = 2
) -> tuple[Image.Image, Image.Image]:
    """One image of class ``pose`` and the figure's silhouette (mode ``L``, 255 on the figure)."""
    big = size * scale
    img = Image.new("RGB", (big, big))
    _draw_background(img, rng)
    silhouette = Image.new("L", (big, big), 0)
    draw, mask = ImageDraw.Draw(img), ImageDraw.Draw(silhouette)
    angles = {k: v + rng.normal(0, 8) for k, v in POSES[pose].items()}
    facing = 1 if rng.random() < 0.5 else -1
    height = rng.uniform(0.7, 0.92) * big
    torso, upper, lower, head = 0.3 * height, 0.17 * height, 0.16 * height, 0.08 * height
    width = max(2, int(rng.uniform(0.1, 0.13) * height))
    rot = math.radians(angles.pop("body", 0.0) * facing)
    c, s = math.cos(rot), math.sin(rot)

    def seg(angle: float) -> np.ndarray:
        v = _vec(angle)
        return np.array([v[0] * facing, v[1]])

    hip = np.zeros(2)
    neck = hip + torso * seg(180 - angles["torso"])
    shoulder = hip + 0.9 * (neck - hip)
    lines = [(hip, neck)]
    for side in ("1", "2"):
        elbow = shoulder + upper * seg(angles["ua" + side])
        hand = elbow + lower * seg(angles["fa" + side])
        knee = hip + (upper + 0.03 * height) * seg(angles["th" + side])
        foot = knee + (lower + 0.04 * height) * seg(angles["sh" + side])
        lines += [(shoulder, elbow), (elbow, hand), (hip, knee), (knee, foot)]
    head_centre = neck + (head + width / 2) * (neck - hip) / np.linalg.norm(neck - hip)
    all_pts = np.array([p for line in lines for p in line] + [head_centre])
    rotated = all_pts @ np.array([[c, s], [-s, c]])
    lo, hi = rotated.min(0) - head, rotated.max(0) + head
    extent = hi - lo
    offset = np.array([rng.uniform(0, max(big - e, 0)) for e in extent]) - lo
    placed = rotated + offset
    colour = _contrasting_colour(img, rng)
    for target, fill in ((draw, colour), (mask, 255)):
        for i in range(len(lines)):
            a, b = placed[2 * i], placed[2 * i + 1]
            target.line([tuple(a), tuple(b)], fill=fill, width=width)
            for p in (a, b):
                target.ellipse([p[0] - width / 2, p[1] - width / 2, p[0] + width / 2, p[1] + width / 2], fill=fill)
        hx, hy = placed[-1]
        target.ellipse([hx - head, hy - head, hx + head, hy + head], fill=fill)
    small = (size, size)
    return img.resize(small, Image.Resampling.LANCZOS), silhouette.resize(small, Image.Resampling.BILINEAR)


def generate(
    out: str | Path,
    per_class: int = 300,
    size: int = 64,
    seed: int = 0,
    unlabeled_fraction: float = 0.3,
    duplicate_fraction: float = 0.01,
    progress: bool = True,
) -> Path:
    """Write the embedded dataset to ``out`` in the Kaggle HAR layout; returns ``out``."""
    out = Path(out)
    for part in ("train", "test"):
        (out / part).mkdir(parents=True, exist_ok=True)
        (out / SILHOUETTES / part).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class))
    n_test = int(round(unlabeled_fraction * len(labels)))
    test_labels = rng.integers(0, len(CLASSES), n_test)
    rows = []
    total = len(labels) + n_test
    bar = tqdm(total=total, desc=f"drawing {total} images", disable=not progress)

    def write(part: str, name: str, pose: str, rng: np.random.Generator) -> None:
        image, silhouette = draw_person_with_mask(pose, size, rng)
        image.save(out / part / name, quality=92)
        silhouette.save(out / SILHOUETTES / part / silhouette_name(name))

    for i, label in enumerate(labels):
        name = f"Image_{i + 1}.jpg"
        write("train", name, CLASSES[label], np.random.default_rng([seed, 0, i]))
        rows.append((name, CLASSES[label]))
        bar.update()
    # HAR has exact duplicates; copy a few files byte for byte under new names.
    n_dup = int(duplicate_fraction * len(rows))
    for j, src in enumerate(rng.choice(len(rows), n_dup, replace=False)):
        name = f"Image_{len(labels) + j + 1}.jpg"
        (out / "train" / name).write_bytes((out / "train" / rows[src][0]).read_bytes())
        sil = out / SILHOUETTES / "train"
        (sil / silhouette_name(name)).write_bytes((sil / silhouette_name(rows[src][0])).read_bytes())
        rows.append((name, rows[src][1]))
    test_names = []
    for i, label in enumerate(test_labels):
        name = f"Image_{i + 1}.jpg"
        write("test", name, CLASSES[label], np.random.default_rng([seed, 1, i]))
        test_names.append(name)
        bar.update()
    bar.close()
    with (out / "Training_set.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)
    with (out / "Testing_set.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename"])
        writer.writerows([n] for n in test_names)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return out


def ensure_embedded(out: str | Path, per_class: int = 300, size: int = 64, seed: int = 0) -> Path:
    """Generate the embedded dataset unless a complete one with the same parameters exists.

    Generated into a private folder and renamed into place, so processes that start together
    (one per GPU, notebooks side by side) never see, or delete, each other's half-written copy.
    """
    out = Path(out)
    params = f"per_class={per_class} size={size} seed={seed} generator={GENERATOR_VERSION}\n"

    def complete() -> bool:
        stamp = out / ".synth-params"
        return stamp.is_file() and stamp.read_text() == params and (out / "Training_set.csv").is_file()

    if complete():
        return out
    shutil.rmtree(out, ignore_errors=True)  # an older generator's images, or a half-written copy
    out.parent.mkdir(parents=True, exist_ok=True)
    private = out.parent / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(private, ignore_errors=True)
    generate(private, per_class=per_class, size=size, seed=seed)
    (private / ".synth-params").write_text(params)
    try:
        private.rename(out)
    except OSError:  # another process finished first: keep its copy (same seed, same bytes)
        shutil.rmtree(private, ignore_errors=True)
        if not complete():
            raise
    return out

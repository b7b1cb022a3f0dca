"""Images per second per CPU core for the three ways to feed pre-training, at two crop recipes.

* decode: JPEG bytes -> RGB (what every path must do in the loader);
* per-image: decode + the PIL multi-crop pipeline (``data.augment_on=loader``);
* batched: decode + canvas (its side from the crop recipe, ``canvas_size``) in the loader, then
  the batched multi-crop (``data.augment_on=device``),
  here run on the CPU: on a GPU that second half leaves the CPU entirely.

One thread, median of ``--repeats`` passes over the same images.

    python benchmarks/loader_bench.py [--images 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch

from dinokit.config import make_config
from dinokit.data.batch_crops import device_augmentation
from dinokit.data.crops import MultiCrop
from dinokit.data.images import load_rgb
from dinokit.data.synth import CLASSES, draw_person


def _jpegs(n: int, size: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        draw_person(CLASSES[i % len(CLASSES)], size, np.random.default_rng(i)).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _rate(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.manual_seed(0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def measure(preset: str, image_px: int, n: int, repeats: int, batch: int = 32) -> dict[str, float]:
    c = make_config(preset).crops
    args = (c.global_size, c.local_size, c.n_local, c.global_scale, c.local_scale, c.blur_p, c.blur_sigma)
    jpegs = _jpegs(n, image_px)
    per_image, (decode, batched) = MultiCrop(*args), device_augmentation(c)

    def run_decode() -> None:
        for data in jpegs:
            load_rgb(data)

    def run_per_image() -> None:
        for data in jpegs:
            per_image(load_rgb(data))

    def run_batched() -> None:
        for start in range(0, n, batch):
            items = [decode(load_rgb(data)) for data in jpegs[start : start + batch]]
            batched(torch.stack([i["canvas"] for i in items]), torch.stack([i["hw"] for i in items]))

    crops = f"2x{c.global_size} + {c.n_local}x{c.local_size}"
    return {
        "preset": preset,
        "images": f"{image_px} px JPEG",
        "crops": crops,
        "decode": _rate(run_decode, n, repeats),
        "per_image": _rate(run_per_image, n, repeats),
        "batched": _rate(run_batched, n, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure("har-vits8", 300, args.images, args.repeats), measure("cpu-demo", 64, args.images, args.repeats)]
    print(
        f"{'preset':<10} {'images':<12} {'crops':<16} {'decode':>8} {'per-image':>10} {'batched':>9}  (img/s, 1 core)"
    )
    for r in rows:
        print(
            f"{r['preset']:<10} {r['images']:<12} {r['crops']:<16} {r['decode']:>8.0f} {r['per_image']:>10.1f} "
            f"{r['batched']:>9.1f}  batched/per-image {r['batched'] / r['per_image']:.2f}x"
        )


if __name__ == "__main__":
    main()

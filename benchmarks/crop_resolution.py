"""How much source detail each crop carries: full resolution, the device path's canvas, the old canvas.

For each source size and crop recipe it draws ``--draws`` boxes with torchvision's
``RandomResizedCrop.get_params`` and reports:

* upsampled: the share of crops cut from fewer pixels than they are resized to (the crop's short
  side, in the image it is cut from, below the output side);
* effective px: that side capped at the output side, the detail the crop carries: its median and
  its 10th percentile.

Geometries: ``source`` cuts boxes from the decoded image (the per-image pipeline); ``canvas N``
first scales the image down to fit an N px square, then cuts the same boxes from that: 576 px is
the device path's canvas for this recipe (``dinokit.data.batch_crops.canvas_size``), 264 px the
one it used before (``ceil(1.15 * 224 / 8) * 8``).

    python benchmarks/crop_resolution.py [--draws 20000] [--json report/fidelity/crop_resolution.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms

from dinokit.data.batch_crops import canvas_size

RECIPES = {"global 224": (224, (0.32, 1.0)), "local 96": (96, (0.05, 0.32))}
SOURCES = {"300 px (300x225)": (225, 300), "640 px (640x480)": (480, 640)}
OLD_CANVAS = 264


def crop_sides(hw: tuple[int, int], scale: tuple[float, float], draws: int, canvas: int | None) -> np.ndarray:
    """Short side (px) of ``draws`` random boxes in the image the crops are cut from."""
    h, w = hw
    if canvas is not None:
        factor = min(1.0, canvas / max(h, w))
        h, w = max(1, round(h * factor)), max(1, round(w * factor))
    image = torch.empty(3, h, w)
    boxes = [transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(draws)]
    return np.array([min(bh, bw) for _, _, bh, bw in boxes], dtype=np.float64)


def measure(draws: int, seed: int = 0) -> list[dict]:
    rows = []
    for source, hw in SOURCES.items():
        for recipe, (out, scale) in RECIPES.items():
            (g_out, g_scale), (l_out, l_scale) = RECIPES["global 224"], RECIPES["local 96"]
            new = canvas_size(g_out, l_out, g_scale, l_scale)
            for geometry, canvas in (("source", None), (f"canvas {new}", new), (f"canvas {OLD_CANVAS}", OLD_CANVAS)):
                torch.manual_seed(seed)
                sides = crop_sides(hw, scale, draws, canvas)
                rows.append(
                    {
                        "source": source,
                        "crop": recipe,
                        "geometry": geometry,
                        "upsampled": float(np.mean(sides < out)),
                        "effective_px": float(np.median(np.minimum(sides, out))),
                        "effective_px_p10": float(np.percentile(np.minimum(sides, out), 10)),
                        "output_px": out,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = measure(args.draws)
    print(f"{'source':<18} {'crop':<11} {'geometry':<11} {'upsampled':>9} {'effective px: median, p10':>27}")
    for r in rows:
        print(
            f"{r['source']:<18} {r['crop']:<11} {r['geometry']:<11} {r['upsampled']:>9.0%} "
            f"{r['effective_px']:>12.0f}, {r['effective_px_p10']:>4.0f} of {r['output_px']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"draws": args.draws, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The held-out images the linear probe gets most confidently wrong: a gallery for the report.

Saved beside the metrics (``RUN_DIR/eval/failures.pt``: uint8 thumbnails, names, true and
predicted classes, confidence) so the report draws it from saved results and never reads the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit import runs
from dinokit.data.images import BadImage, load_rgb
from dinokit.data.split import Split

FAILURES = "failures.pt"


def most_confident_mistakes(truth: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, k: int) -> list[int]:
    """Positions of at most ``k`` wrong predictions, most confident first."""
    wrong = np.flatnonzero(truth != predicted)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:k].tolist()


def save_failures(
    out_dir: Path, split: Split, val_indices: Sequence[int], predicted: np.ndarray, confidence: np.ndarray,
    k: int = 12, size: int = 96,
) -> Path | None:  # fmt: skip
    """Thumbnails (``size`` px, aspect kept) of the ``k`` most confident mistakes; None when there are none."""
    records = [split.val[i] for i in val_indices]
    truth = np.array([r.label for r in records])
    picked = most_confident_mistakes(truth, predicted, confidence, k)
    thumbs, rows = [], []
    for pos in picked:
        rec = records[pos]
        try:
            image = load_rgb(rec.source)
        except BadImage:
            continue
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        thumbs.append(torch.from_numpy(np.asarray(canvas).copy()))
        rows.append((rec.name, split.classes[rec.label], split.classes[int(predicted[pos])], float(confidence[pos])))
    path = out_dir / FAILURES
    if not thumbs:
        path.unlink(missing_ok=True)  # never a stale gallery from an earlier evaluation
        return None
    names, true, pred, conf = (list(col) for col in zip(*rows, strict=True))
    runs.save_atomic({"images": torch.stack(thumbs), "names": names, "true": true, "predicted": pred,
                      "confidence": conf}, path)  # fmt: skip
    return path

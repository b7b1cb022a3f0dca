"""Decode any image a dataset may hold into RGB, or say exactly why it cannot be used.

HAR-style folders contain odd files (CMYK JPEGs, palette PNGs, truncated downloads). Training
must never crash on them: :func:`load_rgb` raises :class:`BadImage` with a short reason, and
:class:`ProblemLog` counts those reasons so one summary can be printed at the end.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

log = logging.getLogger(__name__)

# A HAR photo is at most a few megapixels; anything above this is refused as a
# decompression bomb (PIL's own limit is ~89 Mpx and only warns below 2x that).
MAX_PIXELS = 40_000_000


class BadImage(Exception):
    """An image that cannot be used; ``str(exc)`` is a short reason such as ``truncated``."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float greyscale: rescale to 8 bits instead of clipping to white.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load_rgb(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``source`` (a path or encoded bytes) as a fully decoded RGB image."""
    try:
        if isinstance(source, bytes):
            if not source:
                raise BadImage("empty file")
            handle: io.BytesIO | str | Path = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise BadImage("missing file")
            if path.stat().st_size == 0:
                raise BadImage("empty file")
            handle = path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as img:
                if img.width * img.height > max_pixels:
                    raise BadImage(f"too large ({img.width}x{img.height} px, decompression bomb?)")
                img.load()
                return _to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too large (decompression bomb)") from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else f"unreadable ({exc})"
        raise BadImage(reason) from None
    except (ValueError, SyntaxError) as exc:  # PIL raises these for some corrupt headers
        raise BadImage(f"corrupt ({exc})") from None


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture


@dataclass
class ProblemLog:
    """Counts skipped inputs by reason and keeps the first few offenders for the summary."""

    counts: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    max_examples: int = 5

    def add(self, name: str, reason: str) -> None:
        key = reason.split(" (")[0]
        self.counts[key] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((name, reason))

    def merge(self, other: ProblemLog) -> None:
        self.counts.update(other.counts)
        for name, reason in other.examples:
            if len(self.examples) < self.max_examples:
                self.examples.append((name, reason))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no problems found"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        first = "; ".join(f"{name}: {reason}" for name, reason in self.examples)
        return f"skipped {self.total} input(s): {parts}. First: {first}"

    def warn_once(self, where: str) -> None:
        if self.total:
            log.warning("%s: %s", where, self.summary())

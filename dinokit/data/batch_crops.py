"""Multi-crop on the training device: one batched pass instead of one PIL pipeline per image.

The loader workers only decode: each image is scaled down (never up) to fit a square canvas,
padded, and shipped as uint8 with its true size (:class:`DecodeToCanvas`). The canvas is sized
from the crop recipe (:func:`canvas_size`) so that, for any source up to 4:3, even the smallest
crop is cut from at least as many pixels as it is resized to, along its short side: a crop is
upsampled only where the per-image pipeline, cutting from the full-resolution image, upsamples it too
(``benchmarks/crop_resolution.py``). On the device, :class:`BatchMultiCrop` draws every random
parameter per sample and applies the same augmentations as the per-image pipeline
(:mod:`dinokit.data.crops`), with the same distributions:

* random resized crops: scale and log-uniform aspect ratio in [3/4, 4/3], ten tries then a centre
  crop, as ``torchvision``'s ``RandomResizedCrop.get_params``, drawn inside each image's own size;
  cut and resized by ``torchvision.ops.roi_align`` (bilinear, averaging over the source pixels of
  each output pixel: antialiased like the per-image pipeline's bicubic resize, a little softer);
* horizontal flip p=0.5; colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 with torchvision's formulas;
  greyscale p=0.2; Gaussian blur (9 px, sigma in the recipe's range, 0.1-2.0 by default) with the
  per-view probabilities; solarisation at 128/255 with p=0.2 on the second global crop (kornia);
* ImageNet normalisation.

Why not cut the crops in the loader, at source resolution, as the per-image pipeline does? It was
tried: the loader's CPU cost per image rose about 15x at ``har-vits8`` sizes (300 px JPEGs, one
core: 104 img/s against about 1,600 for decode and canvas), about 5 worker cores for a GPU at
450 img/s, and the ``cpu-demo`` step became 15 % slower on 2 cores.

Random draws come from torch's global generator, which the training loop seeds per step and per
process: a resumed run sees the crops an uninterrupted run would have.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops import roi_align

from dinokit.config import CropConfig
from dinokit.data.crops import BLUR_KERNEL, BLUR_P, BLUR_SIGMA, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)
RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect-ratio range


AUGMENT_ON = ("auto", "loader", "device")


def kornia_available() -> bool:
    return importlib.util.find_spec("kornia") is not None


def choose_augment_on(requested: str, device_type: str) -> str:
    """``auto`` is ``device`` everywhere it was measured: on CUDA a GPU step outruns any per-image PIL
    pipeline; on a 2-core CPU the batched pass made the ``cpu-demo`` step 1.8x faster (README).
    Without kornia (a bare GPU image) ``auto`` falls back to the loader; asking for ``device`` fails."""
    if requested not in AUGMENT_ON:
        raise ValueError(f"data.augment_on must be one of {', '.join(AUGMENT_ON)}; got {requested!r}")
    if requested == "device" and not kornia_available():
        raise ValueError("data.augment_on=device needs kornia (pip install -r requirements.txt); or use loader")
    if requested == "auto":
        if kornia_available():
            return "device"
        log.warning("kornia is not installed: augmenting in the loader (pip install kornia for the faster path)")
        return "loader"
    return requested


MAX_ASPECT = 4 / 3  # sources up to this aspect ratio never lose crop resolution to the canvas


def canvas_size(
    global_size: int, local_size: int, global_scale: tuple[float, float], local_scale: tuple[float, float]
) -> int:
    """Canvas side (a multiple of 8) at which even the smallest crop of either kind, from a source of
    aspect up to 4:3 scaled to fit, spans its output size along its *short* side: such a source keeps
    a short side of at least 3/4 of the canvas, and a crop of area fraction ``s`` and aspect up to 4:3
    a short side of at least ``sqrt(s)`` times that, so ``out * (4/3) / sqrt(min_scale)``. DINOv2's
    recipe (224 @ 0.32, 96 @ 0.05) gives 576 px, ``cpu-demo``'s 112 px. ``local_size=0``: globals only."""
    sides = [(global_size, global_scale[0])] + ([(local_size, local_scale[0])] if local_size else [])
    need = max(out * MAX_ASPECT / math.sqrt(scale) for out, scale in sides)
    return int(math.ceil(need / 8) * 8)


class DecodeToCanvas:
    """Loader-side transform for device augmentation: PIL image -> uint8 canvas + its true size."""

    def __init__(self, canvas: int) -> None:
        self.canvas = canvas

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        w, h = image.size
        scale = min(1.0, self.canvas / max(w, h))
        if scale < 1.0:
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            image = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
        # Pad by repeating the edge pixels: a crop that touches the image's edge is resampled
        # bilinearly and reads one pixel past it, which must not be a dark border.
        pixels = np.pad(np.asarray(image, dtype=np.uint8), ((0, self.canvas - h), (0, self.canvas - w), (0, 0)), "edge")
        return {"canvas": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), "hw": torch.tensor([h, w])}


def crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], tries: int = 10) -> torch.Tensor:
    """Random resized crop boxes (x1, y1, x2, y2), one per image of size ``sizes`` (B, 2) = (h, w).

    Vectorised ``RandomResizedCrop.get_params``: up to ``tries`` draws of area fraction and
    log-uniform aspect ratio; the first that fits is kept; else a centre crop at the nearest ratio.
    """
    b = sizes.shape[0]
    h, w = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = h * w * torch.empty(b, tries, dtype=torch.float64).uniform_(*scale)
    ratio = torch.exp(torch.empty(b, tries, dtype=torch.float64).uniform_(math.log(RATIO[0]), math.log(RATIO[1])))
    cw, ch = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(fits.any(1), fits.double().argmax(1), torch.full((b,), -1))
    pick = first.clamp(min=0).unsqueeze(1)
    cw, ch = cw.gather(1, pick).squeeze(1), ch.gather(1, pick).squeeze(1)
    h, w = h.squeeze(1), w.squeeze(1)
    # fallback: the whole image, cut to the nearest allowed aspect ratio
    in_ratio = w / h
    fw = torch.where(in_ratio < RATIO[0], w, torch.where(in_ratio > RATIO[1], torch.round(h * RATIO[1]), w))
    fh = torch.where(in_ratio < RATIO[0], torch.round(w / RATIO[0]), h)
    missed = first < 0
    cw, ch = torch.where(missed, fw, cw), torch.where(missed, fh, ch)
    top = torch.floor(torch.rand(b, dtype=torch.float64) * (h - ch + 1))
    left = torch.floor(torch.rand(b, dtype=torch.float64) * (w - cw + 1))
    top = torch.where(missed, torch.floor((h - ch) / 2), top)
    left = torch.where(missed, torch.floor((w - cw) / 2), left)
    return torch.stack([left, top, left + cw, top + ch], dim=1).float()


class BatchMultiCrop(nn.Module):
    """Device-side multi-crop: uint8 canvases (B, 3, C, C) + sizes (B, 2) -> normalised crops, view-major."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        blur_p: tuple[float, float, float] = BLUR_P,
        blur_sigma: tuple[float, float] = BLUR_SIGMA,
    ) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.flip = K.RandomHorizontalFlip(p=0.5)
        self.jitter = K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)
        self.gray = K.RandomGrayscale(p=0.2)
        self.solarize = K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2)  # threshold exactly 0.5
        p1, p2, p_local = blur_p
        self.blurs = nn.ModuleList([self._blur(p1, blur_sigma), self._blur(p2, blur_sigma)])
        self.local_blur = self._blur(p_local, blur_sigma)
        self.last_params: dict[str, dict] = {}  # per view kind, for tests and curious students

    @staticmethod
    def _blur(p: float, sigma: tuple[float, float]) -> nn.Module:
        import kornia.augmentation as K

        return K.RandomGaussianBlur((BLUR_KERNEL, BLUR_KERNEL), sigma, p=p)

    def _view(self, pixels, sizes, image, out, scale, blur, solarize, name):
        """Crops of ``pixels[image]`` (one per entry of ``image``) through the whole pipeline."""
        boxes = crop_boxes(sizes[image].cpu(), scale).to(pixels.device)
        rois = torch.cat([image.to(pixels.device, boxes.dtype).unsqueeze(1), boxes], 1)
        x = roi_align(pixels, rois, (out, out), 1.0, -1, aligned=True).clamp_(0, 1)
        x = self.gray(self.jitter(self.flip(x)))
        params = {"boxes": boxes.cpu(), "flip": self.flip._params["batch_prob"], "jitter": self.jitter._params}
        params["gray"] = self.gray._params["batch_prob"]
        x = blur(x)
        params["blur"] = blur._params
        if solarize:
            x = self.solarize(x)
            params["solarize"] = self.solarize._params["batch_prob"]
        self.last_params[name] = params
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, canvas: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = canvas.float().div_(255)
        images = torch.arange(len(canvas))
        g, s = self.global_size, self.global_scale
        views = [self._view(pixels, sizes, images, g, s, self.blurs[v], v == 1, f"global{v}") for v in range(2)]
        out = {"global": torch.cat(views)}
        if self.n_local:  # view-major: every image's local crop 0, then every image's local crop 1, ...
            local = images.repeat(self.n_local)
            out["local"] = self._view(
                pixels, sizes, local, self.local_size, self.local_scale, self.local_blur, False, "local"
            )
        return out

    def on_device(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """The augmented views of a collated batch, its canvases moved to ``device`` first."""
        return self(batch["canvas"].to(device, non_blocking=True), batch["hw"])


def device_augmentation(crops: CropConfig, n_local: int | None = None) -> tuple[DecodeToCanvas, BatchMultiCrop]:
    """The loader's transform and the device's multi-crop for a crop recipe (``n_local`` overrides)."""
    c = crops
    n = c.n_local if n_local is None else n_local
    canvas = canvas_size(c.global_size, c.local_size if n else 0, c.global_scale, c.local_scale)
    augment = BatchMultiCrop(c.global_size, c.local_size, n, c.global_scale, c.local_scale, c.blur_p, c.blur_sigma)
    return DecodeToCanvas(canvas), augment

"""Frozen feature extraction: batched, no grad, on any device, bad images skipped, with a progress bar.

On a GPU the forward runs under autocast (bf16 or fp16, as :func:`dinokit.precision.choose_precision`
picks) and features come back as fp32 on the CPU. A batch that does not fit is split in halves
until it does, so the default batch size never stops an evaluation. The loader hands over uint8
pixels, normalised on the device (:mod:`dinokit.eval.eval_images`), and the decoded set is cached
on disk (:mod:`dinokit.eval.eval_cache`): the kNN monitor's next call on the same split decodes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinokit.data.har import Record
from dinokit.data.images import ProblemLog
from dinokit.eval.eval_cache import DecodedSet, cache_path, load_decoded, save_decoded
from dinokit.eval.eval_images import EvalImages, collate, default_batch_size, default_num_workers, normalize
from dinokit.models.vit import VisionTransformer
from dinokit.precision import autocast

Batch = tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]


FEATURE_KINDS = ("cls", "cls+avgpool", "cls4", "cls4+avgpool")


def _assemble(layers: list[tuple[torch.Tensor, torch.Tensor]], kind: str) -> torch.Tensor:
    use = layers[-4:] if kind.startswith("cls4") else layers[-1:]
    parts = [cls for _, cls in use]
    if kind.endswith("avgpool"):
        parts.append(layers[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1)


def features_of(backbone: VisionTransformer, images: torch.Tensor, kinds: Sequence[str] = ("cls",)) -> dict:
    """Feature vectors per image in the variants DINOv2's linear evaluation uses (one forward)."""
    if kinds and set(kinds) <= {"cls"}:
        # The last block for the CLS token alone (its other outputs feed nothing): the same
        # features within float rounding, 1.2x faster on a 2-core CPU (docs: README, issue 19).
        return {"cls": backbone.forward_selected(images)["cls"]}
    unknown = set(kinds) - set(FEATURE_KINDS)
    if unknown:
        raise ValueError(f"unknown feature kinds {sorted(unknown)}; choose from {FEATURE_KINDS}")
    layers = backbone.get_intermediate_layers(images, n=4 if any(k.startswith("cls4") for k in kinds) else 1)
    return {kind: _assemble(layers, kind) for kind in kinds}


def _forward_fitting(backbone: VisionTransformer, images: torch.Tensor, kinds: Sequence[str]) -> dict:
    """``features_of``, halving the batch on out-of-memory until it fits."""
    try:
        return features_of(backbone, images, kinds)
    except torch.OutOfMemoryError:
        if len(images) == 1:
            raise
        if images.is_cuda:
            torch.cuda.empty_cache()
        half = len(images) // 2
        parts = [_forward_fitting(backbone, images[:half], kinds), _forward_fitting(backbone, images[half:], kinds)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _cached_batches(decoded: DecodedSet, batch_size: int) -> Iterator[Batch]:
    if not len(decoded.images):
        yield None, None, decoded.bad
    for start in range(0, len(decoded.images), batch_size):
        end = start + batch_size
        yield decoded.images[start:end], decoded.indices[start:end], decoded.bad if start == 0 else []


def decoded_batches(
    records: Sequence[Record], size: int, batch_size: int, num_workers: int, cache: bool
) -> Iterator[Batch]:
    """``(uint8 images, record indices, bad (name, reason))`` batches: read back from the cache when
    it holds these records at this size, else decoded by the loader (and then cached when asked)."""
    path = cache_path(records, size) if cache else None
    decoded = load_decoded(path) if path is not None else None
    if decoded is not None:
        yield from _cached_batches(decoded, batch_size)
        return
    loader = DataLoader(EvalImages(records, size), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    images_kept = [torch.empty(0, 3, size, size, dtype=torch.uint8)]
    indices_kept, all_bad = [torch.empty(0, dtype=torch.long)], []
    for images, indices, bad in loader:
        all_bad += bad
        if path is not None and images is not None:
            images_kept.append(images)
            indices_kept.append(indices)
        yield images, indices, bad
    if path is not None:
        save_decoded(DecodedSet(torch.cat(images_kept), torch.cat(indices_kept), all_bad), path)


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Normalised float images on ``device``. Pinned here, one batch at a time, not in the loader:
    its batches are also kept for the cache, and pinned memory is never handed back to the OS."""
    if device.type == "cuda":
        images = images.pin_memory().to(device, non_blocking=True)
    return normalize(images)


@torch.no_grad()
def extract_features(
    backbone: VisionTransformer,
    records: Sequence[Record],
    size: int,
    batch_size: int | None = None,
    kinds: Sequence[str] = ("cls",),
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "features",
    cache: bool = True,
) -> dict:
    """``{"features": {kind: (N, D) float tensor}, "labels": (N,), "indices": (N,), "problems": ProblemLog}``.

    ``backbone`` is moved to ``device`` for the extraction and back afterwards. Images that cannot
    be read are skipped; ``indices`` says which records the rows belong to. ``batch_size`` and
    ``num_workers`` default to what suits the device; ``cache`` keeps the decoded images on disk
    (:mod:`dinokit.eval.eval_cache`), so the next call on the same records decodes nothing.
    """
    device = torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    was_training = backbone.training
    home = next(backbone.parameters()).device
    backbone.eval().to(device)
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    indices, problems = [], ProblemLog()
    batches = decoded_batches(records, size, batch_size, num_workers, cache)
    total = math.ceil(len(records) / batch_size)
    for images, idx, bad in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        for name, reason in bad:
            problems.add(name, reason)
        if images is None:
            continue
        images = _to_device(images, device)
        with autocast(precision, device):
            out = _forward_fitting(backbone, images, kinds)
        for kind in kinds:
            feats[kind].append(out[kind].float())  # kept on the device: no sync per batch
        indices.append(idx)
    backbone.train(was_training).to(home)
    problems.warn_once("feature extraction")
    index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)
    return {
        "features": {k: torch.cat(v).cpu() if v else torch.empty(0) for k, v in feats.items()},
        "labels": torch.tensor([records[i].label for i in index.tolist()], dtype=torch.long),
        "indices": index,
        "problems": problems,
    }

"""Frozen feature extraction: batched, no grad, on any device, bad images skipped, with a progress bar.

On a GPU the forward runs under autocast (bf16 or fp16, as :func:`dinokit.precision.choose_precision`
picks) and features come back as fp32 on the CPU. A batch that does not fit is split in halves
until it does, so the default batch size never stops an evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dinokit.data.crops import eval_transform
from dinokit.data.har import Record
from dinokit.data.images import BadImage, ProblemLog, load_rgb
from dinokit.models.vit import VisionTransformer
from dinokit.precision import autocast


class EvalDataset(Dataset):
    def __init__(self, records: Sequence[Record], size: int) -> None:
        self.records = list(records)
        self.transform = eval_transform(size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            return self.transform(load_rgb(rec.source)), rec.label, index, None
        except BadImage as exc:
            return None, rec.label, index, (rec.name, str(exc))


def _collate(items):
    good = [i for i in items if i[0] is not None]
    bad = [i[3] for i in items if i[3] is not None]
    if not good:
        return None, None, None, bad
    return (
        torch.stack([i[0] for i in good]),
        torch.tensor([i[1] for i in good]),
        torch.tensor([i[2] for i in good]),
        bad,
    )


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
        return {"cls": backbone(images)}
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


@torch.no_grad()
def extract_features(
    backbone: VisionTransformer,
    records: Sequence[Record],
    size: int,
    batch_size: int = 128,
    kinds: Sequence[str] = ("cls",),
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
) -> dict:
    """``{"features": {kind: (N, D) float tensor}, "labels": (N,), "indices": (N,), "problems": ProblemLog}``.

    ``backbone`` is moved to ``device`` for the extraction and back afterwards. Images that cannot
    be read are skipped; ``indices`` says which records the rows belong to.
    """
    device = torch.device(device)
    was_training = backbone.training
    home = next(backbone.parameters()).device
    backbone.eval().to(device)
    loader = DataLoader(
        EvalDataset(records, size), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    labels, indices, problems = [], [], ProblemLog()
    for images, labs, idx, bad in tqdm(loader, desc=desc, disable=not progress, leave=False):
        for name, reason in bad:
            problems.add(name, reason)
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        with autocast(precision, device):
            out = _forward_fitting(backbone, images, kinds)
        for kind in kinds:
            feats[kind].append(out[kind].float().cpu())
        labels.append(labs)
        indices.append(idx)
    backbone.train(was_training).to(home)
    problems.warn_once("feature extraction")
    return {
        "features": {k: torch.cat(v) if v else torch.empty(0) for k, v in feats.items()},
        "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        "indices": torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
        "problems": problems,
    }

"""The supervised reference: the same network trained *with* the labels, for the same wall-clock time.

It answers "how much of what was learnable in that time did self-supervision capture?". Same
architecture, same training images (the train split only: labels exist there), the same global
crops and augmentations as pre-training (cut on the device), cross-entropy on a linear head,
AdamW with a warm-up and a cosine schedule over *time* rather than steps, since the budget is
seconds. Its frozen backbone is then probed exactly like the self-supervised one.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinokit.config import Config
from dinokit.data.batch_crops import device_augmentation
from dinokit.data.loader import MultiCropDataset
from dinokit.data.split import Split
from dinokit.models.ssl import build_architecture
from dinokit.models.vit import VisionTransformer
from dinokit.precision import autocast


def _collate(samples: list[dict]) -> dict | None:
    good = [s for s in samples if "bad" not in s]
    if not good:
        return None
    return {
        "canvas": torch.stack([s["canvas"] for s in good]),
        "hw": torch.stack([s["hw"] for s in good]),
        "labels": torch.tensor([s["label"] for s in good]),
    }


def lr_at(fraction: float, base: float, warmup: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` of the time, then a cosine to 0 at the end."""
    if fraction < warmup:
        return base * fraction / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup))))


def train_supervised(
    cfg: Config,
    split: Split,
    seconds: float,
    device: torch.device,
    precision: str = "fp32",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    progress: bool = True,
) -> tuple[VisionTransformer, dict]:
    """Train the run's architecture on the labelled train split for ``seconds``; returns (backbone, stats)."""
    torch.manual_seed(cfg.train.seed)
    model = build_architecture(cfg.model, cfg.crops.global_size).backbone.to(device).train()
    head = nn.Linear(model.embed_dim, len(split.classes)).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    c = cfg.crops
    decode, crops = device_augmentation(c, n_local=0)  # the two global views
    crops = crops.to(device)
    loader = DataLoader(
        MultiCropDataset(split.train, decode, cfg.train.seed),
        batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True, collate_fn=_collate,
        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.train.seed),
    )  # fmt: skip
    start, steps, images = time.perf_counter(), 0, 0
    bar = tqdm(total=round(seconds), desc="supervised reference (s)", disable=not progress, leave=False)
    while time.perf_counter() - start < seconds:
        for batch in loader:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
            if batch is None:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(elapsed / seconds, lr)
            views = crops.on_device(batch, device)["global"]  # 2 views
            labels = batch["labels"].to(device).repeat(2)
            with autocast(precision, device):
                logits = head(model(views).float())
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 3.0)
            optimizer.step()
            steps, images = steps + 1, images + len(batch["labels"])
            bar.n = min(round(time.perf_counter() - start), bar.total)
            bar.refresh()
    bar.close()
    return model.eval(), {"seconds": round(time.perf_counter() - start, 1), "steps": steps, "images_seen": images}

"""Linear probe on frozen features: many heads trained at once, the best picked on a validation
part of ``train``, then evaluated once on the held-out split.

As DINOv2's linear evaluation: a grid of learning rates (and feature variants) is searched
together; features are cached, so the whole grid trains in seconds on a CPU. The held-out split
is never seen during model selection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class ProbeResult:
    feature: str  # which feature variant won
    lr: float
    selection_top1: float  # on the validation part of train
    top1: float  # on the held-out split
    top5: float
    balanced_accuracy: float
    per_class: list[float]  # held-out accuracy per class, %
    confusion: np.ndarray  # (n_classes, n_classes), rows = true class
    predictions: np.ndarray  # held-out predicted labels
    confidence: np.ndarray  # the probe's softmax probability of each held-out prediction
    weight: torch.Tensor  # the chosen head, for predictions on other images
    bias: torch.Tensor
    mean: torch.Tensor  # feature standardisation learned on train
    std: torch.Tensor

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight.t() + self.bias


def _standardise(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return train.mean(0), train.std(0).clamp_min(1e-6)


def train_heads(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one linear head per learning rate in a single batched model (SGD, momentum 0.9,
    cosine schedule). Returns weights (H, C, D) and biases (H, C)."""
    gen = torch.Generator().manual_seed(seed)
    n, d = features.shape
    h = len(lrs)
    weight = torch.zeros(h, n_classes, d, requires_grad=True)
    bias = torch.zeros(h, n_classes, requires_grad=True)
    lr = torch.tensor(lrs, dtype=torch.float32)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x, y = features[idx], labels[idx]
            logits = torch.einsum("nd,hcd->hnc", x, weight) + bias[:, None, :]
            loss = F.cross_entropy(logits.reshape(-1, n_classes), y.repeat(h), reduction="sum") / len(idx)
            grad_w, grad_b = torch.autograd.grad(loss, [weight, bias])
            scale = 0.5 * (1 + np.cos(np.pi * step / total))
            with torch.no_grad():
                for p, g, v in ((weight, grad_w, velocity[0]), (bias, grad_b, velocity[1])):
                    if p is weight and weight_decay:
                        g = g + weight_decay * p
                    v.mul_(0.9).add_(g)
                    p.sub_(v * (lr * scale).view(-1, *([1] * (p.dim() - 1))))
            step += 1
    return weight.detach(), bias.detach()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return 100.0 * (top == labels.unsqueeze(-1)).any(-1).float().mean().item()


def linear_probe(
    train: Mapping[str, torch.Tensor],
    train_labels: torch.Tensor,
    test: Mapping[str, torch.Tensor],
    test_labels: torch.Tensor,
    n_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    selection_fraction: float = 0.2,
    epochs: int = 100,
    seed: int = 0,
) -> ProbeResult:
    """Search feature variants x learning rates on a split of ``train``; refit the winner on all of
    ``train``; report it once on ``test`` (the held-out split)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=gen)
    n_sel = max(1, int(selection_fraction * len(order)))
    sel_idx, fit_idx = order[:n_sel], order[n_sel:]
    best = (-1.0, "", 0.0)
    for kind, feats in train.items():
        mean, std = _standardise(feats[fit_idx])
        w, b = train_heads((feats[fit_idx] - mean) / std, train_labels[fit_idx], n_classes, lrs, epochs, seed=seed)
        logits = torch.einsum("nd,hcd->hnc", (feats[sel_idx] - mean) / std, w) + b[:, None, :]
        for i, lr in enumerate(lrs):
            acc = _accuracy(logits[i], train_labels[sel_idx])
            if acc > best[0]:
                best = (acc, kind, lr)
    selection_top1, kind, lr = best
    mean, std = _standardise(train[kind])
    w, b = train_heads((train[kind] - mean) / std, train_labels, n_classes, [lr], epochs, seed=seed)
    result = ProbeResult(
        kind, lr, selection_top1, 0.0, 0.0, 0.0, [], np.zeros(0), np.zeros(0), np.zeros(0), w[0], b[0], mean, std
    )
    logits = result.predict(test[kind])
    pred = logits.argmax(-1).numpy()
    truth = test_labels.numpy()
    result.top1 = _accuracy(logits, test_labels)
    result.top5 = _accuracy(logits, test_labels, 5)
    result.balanced_accuracy = 100.0 * balanced_accuracy_score(truth, pred)
    result.confusion = confusion_matrix(truth, pred, labels=list(range(n_classes)))
    totals = result.confusion.sum(1)
    result.per_class = [100.0 * result.confusion[c, c] / t if t else float("nan") for c, t in enumerate(totals)]
    result.predictions = pred
    result.confidence = logits.softmax(-1).max(-1).values.numpy()
    return result

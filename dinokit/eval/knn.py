"""Weighted kNN on cosine similarity (DINO's eval_knn.py recipe: k=20, T=0.07).

Each of the k nearest training features votes for its class with weight exp(sim / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, n_classes) from the exponentially weighted votes of the k neighbours."""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_features.shape[0], chunk):
        test = F.normalize(test_features[start : start + chunk].float(), dim=1)
        sims, idx = (test @ train.t()).topk(k, dim=1)
        votes = torch.zeros(test.shape[0], n_classes)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent."""
    scores = knn_scores(train_features, train_labels, test_features, n_classes, k, temperature)
    top = scores.topk(min(5, n_classes), dim=1).indices
    hit = top == test_labels.unsqueeze(1)
    return {"top1": 100.0 * hit[:, 0].float().mean().item(), "top5": 100.0 * hit.any(dim=1).float().mean().item()}

"""kNN and the linear probe on features whose answer is known."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from dinokit.eval.knn import knn_accuracy, knn_scores
from dinokit.eval.linear import linear_probe, train_heads


def test_knn_by_hand() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    scores = knn_scores(train, labels, test, n_classes=2, k=2, temperature=0.07)
    assert scores.argmax(1).tolist() == [0, 1]
    # k=1: the single nearest neighbour votes with weight exp(cos / T)
    one = knn_scores(train, labels, test[:1], n_classes=2, k=1, temperature=0.5)
    cos = torch.nn.functional.cosine_similarity(test[:1], train[:1]).item()
    assert one[0, 0].item() == pytest.approx(np.exp(cos / 0.5), rel=1e-5) and one[0, 1] == 0
    acc = knn_accuracy(train, labels, test, torch.tensor([0, 1]), n_classes=2, k=2)
    assert acc["top1"] == 100.0


def _blobs(n: int, d: int, classes: int, seed: int, separation: float):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=gen) * separation
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + torch.randn(n, d, generator=gen), labels


def test_probe_separable_reaches_near_100() -> None:
    x, y = _blobs(600, 16, 5, 0, separation=4.0)
    xt, yt = _blobs(300, 16, 5, 0, separation=4.0)
    result = linear_probe({"cls": x}, y, {"cls": xt}, yt, n_classes=5, epochs=30)
    assert result.top1 > 97
    assert result.balanced_accuracy == pytest.approx(
        100 * balanced_accuracy_score(yt.numpy(), result.predictions), abs=1e-6
    )
    assert result.confusion.sum() == 300 and np.trace(result.confusion) == pytest.approx(result.top1 * 3, abs=1)


def test_probe_on_shuffled_labels_is_chance() -> None:
    x, y = _blobs(600, 16, 5, 1, separation=4.0)
    xt, yt = _blobs(400, 16, 5, 2, separation=4.0)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    result = linear_probe({"cls": x}, shuffled, {"cls": xt}, yt, n_classes=5, epochs=30)
    assert result.top1 < 35  # chance is 20 %


def test_model_selection_never_sees_the_heldout_labels() -> None:
    x, y = _blobs(400, 8, 4, 3, separation=3.0)
    xt, yt = _blobs(200, 8, 4, 4, separation=3.0)
    a = linear_probe({"cls": x}, y, {"cls": xt}, yt, n_classes=4, epochs=20)
    b = linear_probe({"cls": x}, y, {"cls": xt}, yt[torch.randperm(200)], n_classes=4, epochs=20)
    assert (a.feature, a.lr, a.selection_top1) == (b.feature, b.lr, b.selection_top1)
    assert torch.equal(a.weight, b.weight)


def test_heads_train_in_parallel_with_their_own_lr() -> None:
    x, y = _blobs(200, 4, 3, 5, separation=3.0)
    w, b = train_heads(x, y, 3, lrs=[0.0, 0.1], epochs=5)
    assert w.shape == (2, 3, 4) and torch.all(w[0] == 0) and w[1].abs().sum() > 0

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


# Feature extraction: uint8 loader, normalisation on the device, the decoded-set cache.


def _vit():
    from dinokit.models.vit import build_vit

    torch.manual_seed(0)
    return build_vit("vit_pico", patch_size=8, img_size=16)


def _file_records(folder, n: int = 6, bad: bool = True) -> list:
    from dinokit.data.har import Record
    from tests.conftest import jpeg_bytes

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(i, size=20 + 4 * i))  # sizes vary: the resize matters
        records.append(Record(f"{i}.jpg", i % 3, str(folder / f"{i}.jpg")))
    if bad:
        (folder / "cut.jpg").write_bytes(jpeg_bytes(99)[:200])
        records.insert(2, Record("cut.jpg", 1, str(folder / "cut.jpg")))
    return records


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_uint8_path_gives_the_float_path_features(tmp_path, cache_dir) -> None:
    """The old path (per-image float ``eval_transform``) and the new one see the same pixels: both
    resize the PIL image, which is uint8, so there is no 1/255 rounding between them, and
    ``normalize`` does the same float operations in the same order. The inputs are equal exactly;
    the features only to float summation order (batches of 4 vs one of 6), hence 1e-5."""
    from dinokit.data.crops import eval_transform
    from dinokit.data.images import load_rgb
    from dinokit.eval.eval_images import normalize, uint8_transform
    from dinokit.eval.features import extract_features

    records, vit = _file_records(tmp_path / "img", bad=False), _vit()
    old = torch.stack([eval_transform(16)(load_rgb(r.source)) for r in records])
    new = normalize(torch.stack([uint8_transform(16)(load_rgb(r.source)) for r in records]))
    assert new.dtype == torch.float32 and torch.equal(new, old)
    with torch.no_grad():
        expected = vit.eval()(old)
    got = extract_features(vit, records, 16, batch_size=4, progress=False, cache=False)
    assert torch.allclose(got["features"]["cls"], expected, atol=1e-5)
    assert got["labels"].tolist() == [r.label for r in records]
    assert not cache_dir.exists()  # cache=False writes nothing


def test_second_call_decodes_nothing_and_still_counts_bad_images(tmp_path, cache_dir, monkeypatch) -> None:
    from dinokit.eval import eval_images
    from dinokit.eval.features import extract_features

    records, vit = _file_records(tmp_path / "img"), _vit()
    first = extract_features(vit, records, 16, batch_size=4, num_workers=0, progress=False)
    assert first["problems"].total == 1 and first["problems"].examples[0][0] == "cut.jpg"
    assert first["indices"].tolist() == [0, 1, 3, 4, 5, 6]  # record 2 is the corrupt one
    assert len(list((cache_dir / "eval").glob("16px-7-*.pt"))) == 1

    def no_decoding(source):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(eval_images, "load_rgb", no_decoding)
    second = extract_features(vit, records, 16, batch_size=4, num_workers=0, progress=False)
    assert second["problems"].total == 1 and second["problems"].examples == first["problems"].examples
    assert torch.equal(second["indices"], first["indices"]) and torch.equal(second["labels"], first["labels"])
    assert torch.allclose(second["features"]["cls"], first["features"]["cls"], atol=1e-6)


def test_cache_key_follows_the_files_and_the_size(tmp_path, cache_dir) -> None:
    import os

    from dinokit.eval.eval_cache import cache_key

    records = _file_records(tmp_path / "img", bad=False)
    key = cache_key(records, 16)
    assert cache_key(records, 16) == key and cache_key(records, 24) != key and cache_key(records[1:], 16) != key
    path = records[0].path
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same bytes, new mtime
    assert cache_key(records, 16) != key
    key = cache_key(records, 16)
    with open(path, "ab") as handle:  # rewritten within the same mtime tick: the size still tells
        handle.write(b"\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache_key(records, 16) != key


def test_a_changed_file_is_decoded_again_and_a_broken_cache_is_ignored(tmp_path, cache_dir) -> None:
    from dinokit.eval.features import extract_features
    from tests.conftest import jpeg_bytes

    records, vit = _file_records(tmp_path / "img", bad=False), _vit()
    before = extract_features(vit, records, 16, num_workers=0, progress=False)["features"]["cls"]
    (tmp_path / "img" / "0.jpg").write_bytes(jpeg_bytes(1234, size=32))
    after = extract_features(vit, records, 16, num_workers=0, progress=False)["features"]["cls"]
    assert not torch.allclose(before[0], after[0]) and torch.allclose(before[1:], after[1:], atol=1e-6)
    files = sorted((cache_dir / "eval").glob("*.pt"))
    assert len(files) == 2
    for file in files:
        file.write_bytes(b"not a tensor file")
    again = extract_features(vit, records, 16, num_workers=0, progress=False)["features"]["cls"]
    assert torch.allclose(again, after, atol=1e-6)


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_features(tmp_path, monkeypatch, caplog) -> None:
    from dinokit.eval.features import extract_features

    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "file"))
    out = extract_features(_vit(), _file_records(tmp_path / "img"), 16, num_workers=0, progress=False)
    assert out["features"]["cls"].shape[0] == 6 and "could not write the eval cache" in caplog.text


def test_default_batch_and_workers_suit_the_device() -> None:
    from dinokit.eval.eval_images import default_batch_size, default_num_workers

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_batch_size(cuda) == 256 and default_batch_size(cpu) == 128
    assert [default_num_workers(cuda, n) for n in (1, 2, 16, 64)] == [0, 1, 8, 8]
    assert default_num_workers(cpu, 2) == default_num_workers(cpu, 16) == 0


def test_most_confident_mistakes_by_hand() -> None:
    from dinokit.eval.failures import most_confident_mistakes

    truth = np.array([0, 1, 2, 0, 1])
    predicted = np.array([0, 2, 2, 1, 0])  # wrong at 1, 3, 4
    confidence = np.array([0.99, 0.40, 0.95, 0.80, 0.80])
    assert most_confident_mistakes(truth, predicted, confidence, 2) == [3, 4]  # ties keep their order
    assert most_confident_mistakes(truth, predicted, confidence, 10) == [3, 4, 1]
    assert most_confident_mistakes(truth, truth, confidence, 10) == []


def test_cls_features_skip_the_last_blocks_other_outputs() -> None:
    """The CLS feature comes from the last block computed for the CLS token alone: the full
    forward's feature within float rounding, for fewer FLOPs (the other tokens' projection and MLP)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dinokit.eval.features import features_of
    from dinokit.models.vit import build_vit

    x = torch.randn(3, 3, 16, 16)
    for vit in (_vit().eval(), build_vit("vit_pico", patch_size=8, img_size=16, n_registers=4).eval()):
        with torch.no_grad(), FlopCounterMode(display=False) as full:
            expected = vit.forward_features(x)["cls"]
        with torch.no_grad(), FlopCounterMode(display=False) as lean:
            got = features_of(vit, x)["cls"]
        assert torch.allclose(got, expected, atol=1e-5)
        assert lean.get_total_flops() < full.get_total_flops()

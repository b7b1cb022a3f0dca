"""Loss maths against values derived by hand."""

import math

import torch

from dinokit.config import LossConfig
from dinokit.losses.dino import DINOLoss
from dinokit.losses.ibot import IBOTPatchLoss
from dinokit.losses.koleo import KoLeoLoss
from dinokit.losses.monitor import collapse_stats
from dinokit.losses.objective import DINOv2Objective
from dinokit.losses.teacher_norm import Centering, sinkhorn_knopp


def test_dino_loss_uniform_student_is_log_k() -> None:
    # Student logits all zero -> log-softmax = -log K for every class, whatever the targets.
    k = 8
    student = [torch.zeros(4, k) for _ in range(4)]
    teacher = [torch.softmax(torch.randn(4, k), -1) for _ in range(2)]
    assert math.isclose(float(DINOLoss(0.1)(student, teacher)), math.log(k), rel_tol=1e-6)


def test_dino_loss_skips_identical_views_and_averages_pairs() -> None:
    # Two classes. View 0 of the student matches teacher view 0 exactly (would be loss ~0),
    # but that pair is skipped; only (t0, s1) and (t1, s0) count.
    t0 = torch.tensor([[1.0, 0.0]])
    t1 = torch.tensor([[0.0, 1.0]])
    s0 = torch.tensor([[10.0, 0.0]])  # student temp 1: log p = [log s(10), log s(-10)]
    s1 = torch.tensor([[0.0, 0.0]])  # log p = [-log 2, -log 2]
    loss = DINOLoss(student_temp=1.0)([s0, s1], [t0, t1])
    ce_t0_s1 = math.log(2)
    ce_t1_s0 = -math.log(1 / (1 + math.exp(10)))  # -log softmax(s0)[1]
    assert math.isclose(float(loss), (ce_t0_s1 + ce_t1_s0) / 2, rel_tol=1e-5)


def test_centering_subtracts_ema_and_sharpens() -> None:
    c = Centering(3, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    # centre 0 at first: plain softmax at temperature 0.5
    assert torch.allclose(c.targets(logits, 0.5), torch.softmax(logits / 0.5, -1))
    c.update(logits)  # batch mean [2, 2, 2] -> centre = 0.1 * 2 = 0.2
    assert torch.allclose(c.center, torch.full((1, 3), 0.2))
    c.update(torch.tensor([[12.0, 2.0, 2.0]]))  # 0.9 * 0.2 + 0.1 * [12, 2, 2]
    assert torch.allclose(c.center, torch.tensor([[1.38, 0.38, 0.38]]))


def test_sinkhorn_equipartitions_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 16)
    logits[:, 0] += 2.0  # prototype 0 wins most samples before balancing
    q = sinkhorn_knopp(logits, temperature=0.5, n_iters=100)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)  # rows: distributions
    assert torch.allclose(q.sum(0), torch.full((16,), 64 / 16), atol=1e-2)  # columns: equal share
    q3 = sinkhorn_knopp(logits, temperature=0.5, n_iters=3)  # DINOv2 uses 3 sweeps
    assert torch.allclose(q3.sum(1), torch.ones(64), atol=1e-5)
    assert q3.sum(0).std() < 0.5 * torch.softmax(logits / 0.5, -1).sum(0).std()
    cosine = torch.rand(64, 16) * 2 - 1  # DINO head logits are cosines in [-1, 1]
    shifted = sinkhorn_knopp(cosine + 10, temperature=0.04)  # exp(275) would overflow unshifted
    assert torch.isfinite(shifted).all()
    assert torch.allclose(shifted, sinkhorn_knopp(cosine, temperature=0.04), atol=1e-4)


def test_koleo_by_hand() -> None:
    # Four points on the unit circle at 0, 90, 180, 270 degrees: nearest distance sqrt(2) each.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert math.isclose(float(KoLeoLoss()(x)), -math.log(math.sqrt(2)), rel_tol=1e-5)
    # Scale does not matter (features are L2-normalised first).
    assert math.isclose(float(KoLeoLoss()(5 * x)), -math.log(math.sqrt(2)), rel_tol=1e-5)


def test_koleo_pushes_close_points_apart() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0]], requires_grad=True)
    KoLeoLoss()(x).backward()
    # gradient descent moves the two close points away from each other (y grows apart)
    assert x.grad[0, 1] > 0 and x.grad[1, 1] < 0


def test_ibot_weights_images_equally() -> None:
    k = 4
    student = torch.zeros(3, k)  # every masked patch: uniform student -> CE = log K
    teacher = torch.softmax(torch.randn(3, k), -1)
    weights = torch.tensor([0.5, 0.5, 1.0])  # image A has 2 masked patches, image B one
    loss = IBOTPatchLoss(1.0)(student, teacher, weights, n_crops=4)
    assert math.isclose(float(loss), 2 * math.log(k) / 4, rel_tol=1e-6)  # 2 images' worth / 4 crops


def test_collapse_stats_tell_the_two_collapses_apart() -> None:
    k = 10
    uniform = torch.full((6, k), 1 / k)
    one_mode = torch.zeros(6, k)
    one_mode[:, 3] = 1
    healthy = torch.eye(k)[:6]
    u, o, h = collapse_stats(uniform), collapse_stats(one_mode), collapse_stats(healthy)
    assert math.isclose(u["entropy"], math.log(k), rel_tol=1e-5) and u["kl_uniform"] < 1e-5
    assert o["entropy"] < 1e-5 and math.isclose(o["kl_uniform"], math.log(k), rel_tol=1e-5)
    assert h["entropy"] < 1e-5 and math.isclose(h["kl_uniform"], math.log(k) - math.log(6), rel_tol=1e-5)


def test_objective_sums_named_terms() -> None:
    torch.manual_seed(0)
    cfg = LossConfig(koleo_weight=0.1, ibot_weight=1.0)
    obj = DINOv2Objective(cfg, out_dim=16)
    b = 4
    masks = torch.zeros(2 * b, 9, dtype=torch.bool)
    masks[0, :3] = True
    student = {
        "dino_global": torch.randn(2 * b, 16),
        "dino_local": torch.randn(3 * b, 16),
        "cls": torch.randn(2 * b, 8),
        "ibot": torch.randn(3, 16),
    }
    teacher = {"dino_global": torch.randn(2 * b, 16), "ibot": torch.randn(3, 16)}
    total, logs = obj(student, teacher, masks, teacher_temp=0.04)
    expected = logs["loss_dino"] + logs["loss_ibot"] + 0.1 * logs["loss_koleo"]
    assert math.isclose(float(total), expected, rel_tol=1e-5)
    assert {"teacher_entropy", "teacher_kl_uniform"} <= logs.keys()


def test_sinkhorn_with_no_rows_returns_no_rows() -> None:
    """A process whose crops drew no mask still runs Sinkhorn-Knopp (and its all-reduces)."""
    from dinokit.losses.teacher_norm import sinkhorn_knopp

    out = sinkhorn_knopp(torch.empty(0, 8), 0.05)
    assert out.shape == (0, 8)

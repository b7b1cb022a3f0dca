"""Loss maths against values derived by hand."""

import math

import pytest
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


def _embed(rows: int, dim: int = 6) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim), dim=-1)


def _pair(b: int = 4, n_local: int = 3, k: int = 16, m: int = 7, pad: int = 3) -> tuple[dict, dict, torch.Tensor]:
    """Student / teacher outputs as SSLModel gives them: embeddings, prototypes, padded iBOT rows."""
    w = torch.randn(k, 6)
    student = {
        "dino_global": _embed(2 * b).requires_grad_(), "dino_local": _embed(n_local * b).requires_grad_(),
        "cls": torch.randn(2 * b, 8), "ibot": _embed(m + pad).requires_grad_(),
        "dino_prototypes": w.clone().requires_grad_(), "ibot_prototypes": w.clone().requires_grad_(),
    }  # fmt: skip
    teacher = {"dino_global": _embed(2 * b), "ibot": _embed(m + pad), "dino_prototypes": w, "ibot_prototypes": w}
    weights = torch.cat([torch.full((m,), 1 / m), torch.zeros(pad)])  # one masked crop, then padding rows
    return student, teacher, weights


def test_objective_sums_named_terms() -> None:
    torch.manual_seed(0)
    obj = DINOv2Objective(LossConfig(koleo_weight=0.1, ibot_weight=1.0), out_dim=16)
    student, teacher, weights = _pair()
    total, logs = obj(student, teacher, weights, teacher_temp=0.04)
    expected = float(logs["loss_dino"] + logs["loss_ibot"] + 0.1 * logs["loss_koleo"])
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-5)
    assert {"teacher_entropy", "teacher_kl_uniform"} <= logs.keys()


def test_objective_equals_the_losses_written_out_on_logits(monkeypatch) -> None:
    """The chunked cross-entropies (gradients formed in the forward) give DINOLoss's and
    IBOTPatchLoss's values and gradients, padding rows included; several chunks per loss."""
    import dinokit.losses.prototype_ce as pce

    monkeypatch.setattr(pce, "CHUNK_ELEMENTS", 40)  # 2 rows of K = 16 per chunk
    torch.manual_seed(0)
    cfg = LossConfig(koleo_weight=0.0)
    student, teacher, weights = _pair()
    total, logs = DINOv2Objective(cfg, out_dim=16)(student, teacher, weights, teacher_temp=0.04)
    total.backward()
    ref = {k: v.detach().clone().requires_grad_() if torch.is_tensor(v) else v for k, v in student.items()}
    centre = Centering(16, cfg.center_momentum)
    t_global = centre.targets(teacher["dino_global"] @ teacher["dino_prototypes"].t(), 0.04)
    logits = {k: ref[k] @ ref[p].t() for k, p in (("dino_global", "dino_prototypes"), ("dino_local", "dino_prototypes"),
                                                   ("ibot", "ibot_prototypes"))}  # fmt: skip
    dino = DINOLoss(cfg.student_temp)(
        list(logits["dino_global"].chunk(2)) + list(logits["dino_local"].chunk(3)), list(t_global.chunk(2))
    )
    t_patch = Centering(16).targets(teacher["ibot"][:7] @ teacher["ibot_prototypes"].t(), 0.04)
    ibot = IBOTPatchLoss(cfg.student_temp)(logits["ibot"][:7], t_patch, weights[:7], n_crops=8)
    (dino + ibot).backward()
    assert math.isclose(float(logs["loss_dino"]), float(dino.detach()), rel_tol=1e-5)
    assert math.isclose(float(logs["loss_ibot"]), float(ibot.detach()), rel_tol=1e-5)
    for key in ("dino_global", "dino_local", "dino_prototypes", "ibot_prototypes"):
        assert torch.allclose(student[key].grad, ref[key].grad, atol=1e-6), key
    assert torch.allclose(student["ibot"].grad[:7], ref["ibot"].grad[:7], atol=1e-6)
    assert not student["ibot"].grad[7:].any()  # padding rows learn nothing


def test_chunked_targets_update_the_centre_as_the_whole_batch_would(monkeypatch) -> None:
    import dinokit.losses.prototype_ce as pce

    monkeypatch.setattr(pce, "CHUNK_ELEMENTS", 40)
    torch.manual_seed(0)
    _, teacher, weights = _pair()
    obj = DINOv2Objective(LossConfig(), out_dim=16)
    obj.ibot_center.center.normal_()
    before = obj.ibot_center.center.clone()
    targets = obj._targets(teacher["ibot"], teacher["ibot_prototypes"], 0.04, obj.ibot_center, weights > 0)
    reference = Centering(16)
    reference.center.copy_(before)
    logits = teacher["ibot"][:7] @ teacher["ibot_prototypes"].t()
    assert torch.allclose(targets[:7], reference.targets(logits, 0.04), atol=1e-6)
    reference.update(logits)  # the real rows only: padding rows do not move the centre
    assert torch.allclose(obj.ibot_center.center, reference.center, atol=1e-6)


def test_sinkhorn_ignores_padding_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(10, 8)
    valid = torch.arange(10) < 6
    padded = sinkhorn_knopp(logits.clone(), 0.1, valid=valid)
    assert torch.allclose(padded[:6], sinkhorn_knopp(logits[:6], 0.1), atol=1e-6)
    assert not padded[6:].any()
    assert torch.isfinite(sinkhorn_knopp(logits, 0.1, valid=torch.zeros(10, dtype=torch.bool))).all()


def test_sinkhorn_with_no_rows_returns_no_rows() -> None:
    """A process whose crops drew no mask still runs Sinkhorn-Knopp (and its all-reduces)."""
    from dinokit.losses.teacher_norm import sinkhorn_knopp

    out = sinkhorn_knopp(torch.empty(0, 8), 0.05)
    assert out.shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_prototype_gradients_keep_their_small_entries(dtype) -> None:
    """At K = 65,536 most logit gradients (~1e-7) are below fp16's normal range: the chunked
    cross-entropy lifts them by a power of two before the cast: fp16 then lands within 0.1 % of fp32
    (0.03 % here; unscaled, 0.33 %), bf16 (the range, not the precision) within 0.5 %."""
    from dinokit.losses.prototype_ce import PrototypeCrossEntropy

    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 32), dim=-1).requires_grad_()
    w = torch.nn.functional.normalize(torch.randn(65536, 32), dim=-1).requires_grad_()
    targets = torch.softmax(torch.randn(64, 65536) / 0.04, dim=-1)
    weights = torch.full((64,), 1 / (18 * 64))  # the DINO term's row weight at batch 64, 10 views
    grads = {}
    for d in (torch.float32, dtype):
        z.grad = w.grad = None
        PrototypeCrossEntropy.apply(z, w, targets, weights, 0.1, d).backward()
        grads[d] = (z.grad.clone(), w.grad.clone())
    bound = 1e-3 if dtype == torch.float16 else 5e-3
    for ref, low in zip(grads[torch.float32], grads[dtype], strict=True):
        assert (low - ref).norm() / ref.norm() < bound


def test_without_local_crops_the_dino_term_divides_as_dinov2_does() -> None:
    """dinov2's ssl_meta_arch.py: n_local_crops_loss_terms = max(n_local * n_global, 1), so two global
    views alone give (CE(t1, s0) + CE(t0, s1)) / 3; the 'no local crops' ablation trains with that."""
    torch.manual_seed(0)
    obj = DINOv2Objective(LossConfig(ibot_weight=0.0, koleo_weight=0.0), out_dim=16)
    student, teacher, weights = _pair(n_local=0)
    del student["dino_local"]
    _, logs = obj(student, teacher, weights, teacher_temp=0.04)
    t = Centering(16).targets(teacher["dino_global"] @ teacher["dino_prototypes"].t(), 0.04)
    s = torch.log_softmax(student["dino_global"].detach() @ student["dino_prototypes"].detach().t() / 0.1, -1)
    (t0, t1), (s0, s1) = t.chunk(2), s.chunk(2)
    by_hand = (-(t1 * s0).sum(-1).mean() - (t0 * s1).sum(-1).mean()) / 3
    assert math.isclose(float(logs["loss_dino"]), float(by_hand), rel_tol=1e-5)

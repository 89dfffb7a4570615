"""Each loss against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import byot_loss, compute_loss, dsn_loss, hinted_exits, kd_loss, standard_loss


def _softmax(v: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def _ce(v: list[float], y: int) -> float:
    return -math.log(_softmax(v)[y])


def _kl(teacher: list[float], student: list[float], t: float, t2: bool = True) -> float:
    q, p = _softmax(teacher, t), _softmax(student, t)
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True)) * (t * t if t2 else 1.0)


Z1, Z2 = [2.0, 0.0, -1.0], [0.5, 1.5, 0.0]
F1, F2 = [1.0, 2.0], [0.0, 4.0]
Y = 1


def _tensors() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    return [torch.tensor([Z1]), torch.tensor([Z2])], [torch.tensor([F1]), torch.tensor([F2])], torch.tensor([Y])


def test_byot_paper_form_by_hand() -> None:
    """The ICCV form: KD × T², squared per-sample L2 hint on every shallow exit."""
    logits, feats, y = _tensors()
    alpha, t, lam = 0.3, 3.0, 0.03
    out = byot_loss(logits, feats, y, alpha, t, lam, hint="l2", kd_scale="t2")
    ce = _ce(Z2, Y) + (1 - alpha) * _ce(Z1, Y)
    kd = alpha * _kl(Z2, Z1, t)
    feat = lam * ((1 - 0) ** 2 + (2 - 4) ** 2)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["feature"].item() == pytest.approx(feat, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + kd + feat, rel=1e-5)


def test_byot_reference_form_by_hand() -> None:
    """The reference code: KD without T², batch L2 norm (not squared, not averaged) on the hinted exits."""
    z = [torch.tensor([Z1, Z2]), torch.tensor([Z2, Z1]), torch.tensor([Z2, Z2])]
    f = [torch.tensor([F1, F2]), torch.tensor([F2, F2]), torch.tensor([F2, F1])]
    y = torch.tensor([1, 0])
    out = byot_loss(z, f, y, alpha=0.3, temperature=3.0, feature_weight=0.03, hint="reference")
    # Teacher rows are [Z2, Z2]: exit 1 differs from it in its first row, exit 2 in its second.
    kd = 0.3 * _kl(Z2, Z1, 3, False) / 2 + 0.3 * _kl(Z2, Z1, 3, False) / 2
    # Of 3 exits the reference hints the shallowest only (never the one just before the last).
    diff = [[1 - 0, 2 - 4], [0 - 1, 4 - 2]]  # exit 1's features minus the teacher's [F2, F1]
    feat = 0.03 * math.sqrt(sum(v * v for row in diff for v in row))
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["feature"].item() == pytest.approx(feat, rel=1e-5)


def test_hinted_exits_defaults_and_choices() -> None:
    assert hinted_exits(4, "reference") == [0, 1] and hinted_exits(3, "reference") == [0]
    assert hinted_exits(4, "l2") == [0, 1, 2] and hinted_exits(4, "none") == []
    assert hinted_exits(4, "reference", [3, 1]) == [0, 2]
    with pytest.raises(ValueError, match="shallow exits 1..3"):
        hinted_exits(4, "l2", [4])


def test_byot_terms_switch_off() -> None:
    logits, feats, y = _tensors()
    out = byot_loss(logits, feats, y, use_kd=False, hint="none")
    assert out["kd"].item() == 0 and out["feature"].item() == 0
    assert out["loss"].item() == pytest.approx(_ce(Z1, Y) + _ce(Z2, Y), rel=1e-5)


def test_byot_teacher_is_detached() -> None:
    logits, feats, y = _tensors()
    logits = [z.requires_grad_() for z in logits]
    feats = [f.requires_grad_() for f in feats]
    byot_loss(logits, feats, y, use_kd=True)["kd"].backward()
    assert logits[1].grad is None or logits[1].grad.abs().sum() == 0


def test_dsn_and_standard_by_hand() -> None:
    logits, _, y = _tensors()
    assert dsn_loss(logits, y)["loss"].item() == pytest.approx(_ce(Z1, Y) + _ce(Z2, Y), rel=1e-5)
    assert standard_loss(logits, y)["loss"].item() == pytest.approx(_ce(Z2, Y), rel=1e-5)


def test_kd_by_hand() -> None:
    logits, _, y = _tensors()
    teacher = torch.tensor([[0.0, 3.0, 0.0]])
    out = kd_loss(logits, teacher, y, alpha=0.5, temperature=2.0)
    expected = 0.5 * _ce(Z2, Y) + 0.5 * _kl([0.0, 3.0, 0.0], Z2, 2.0)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    plain = kd_loss(logits, teacher, y, alpha=0.5, temperature=2.0, kd_scale="none")
    assert plain["kd"].item() == pytest.approx(0.5 * _kl([0.0, 3.0, 0.0], Z2, 2.0, False), rel=1e-5)


def test_unknown_method_is_named() -> None:
    logits, feats, y = _tensors()
    with pytest.raises(ValueError, match="Unknown method 'foo'; known: byot"):
        compute_loss("foo", logits, feats, y)
    with pytest.raises(ValueError, match="teacher"):
        compute_loss("kd", logits, feats, y)

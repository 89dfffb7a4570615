"""Training losses as pure functions of logits, features and labels, each returning named terms.

Every function returns ``{"loss", "ce", "kd", "feature", "per_exit"}`` (terms a method does not use
are 0; ``per_exit`` is each exit's share of the loss, as weighted in it, and sums to ``loss``), so the
trainer logs the same keys whatever the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

METHODS = ("byot", "dsn", "standard", "kd", "ramps")
HINTS = ("reference", "l2", "none")
KD_SCALES = ("none", "t2")


def distillation_kl(student: Tensor, teacher: Tensor, temperature: float, scale: str = "t2") -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch, times T² when `scale` is "t2".

    Hinton et al. multiply by T² so that the soft term's gradients keep their size as T grows;
    BYOT's reference code does not ("none"). Its soft cross-entropy differs from this KL by the
    teacher's entropy, a constant for the student, so the gradients are the same.
    """
    log_p = F.log_softmax(student / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p, q, reduction="batchmean")
    return kl * temperature**2 if scale == "t2" else kl


def feature_hint(student: Tensor, teacher: Tensor) -> Tensor:
    """Squared L2 distance ‖F_i − F_C‖² per sample, averaged over the batch (the ICCV paper's form)."""
    return (student - teacher).pow(2).flatten(1).sum(1).mean()


def batch_l2_hint(student: Tensor, teacher: Tensor) -> Tensor:
    """The reference code's `torch.dist`: the L2 norm of the whole batch's difference, not squared or averaged."""
    return torch.dist(student, teacher)


def hinted_exits(num_exits: int, hint: str, exits: Sequence[int] | None = None) -> list[int]:
    """0-based shallow exits that get the feature hint.

    `exits` (1-based) when given; otherwise every shallow exit for "l2", and for "reference" every
    shallow exit but the one just before the last (the reference code hints exits 1–2 of 4).
    """
    if hint == "none":
        return []
    if exits is not None:
        bad = [e for e in exits if not 1 <= e < num_exits]
        if bad:
            raise ValueError(f"hint exits must be shallow exits 1..{num_exits - 1}, got {bad}")
        return sorted({e - 1 for e in exits})
    shallow = list(range(num_exits - 1))
    return shallow if hint == "l2" else shallow[:-1] or shallow


def _terms(ce: Tensor, per_exit: Tensor, kd: Tensor | float = 0.0, feature: Tensor | float = 0.0) -> dict[str, Tensor]:
    zero = ce.new_zeros(())
    kd_t = kd if isinstance(kd, Tensor) else zero + kd
    feat_t = feature if isinstance(feature, Tensor) else zero + feature
    return {"loss": ce + kd_t + feat_t, "ce": ce, "kd": kd_t, "feature": feat_t, "per_exit": per_exit}


def _last_only(logits: Sequence[Tensor], term: Tensor) -> Tensor:
    """A per-exit vector of zeros but the deepest exit's `term`."""
    return torch.cat([term.new_zeros(len(logits) - 1), term.detach().reshape(1)])


def byot_loss(
    logits: Sequence[Tensor],
    features: Sequence[Tensor],
    target: Tensor,
    alpha: float = 0.3,
    temperature: float = 3.0,
    feature_weight: float = 0.03,
    use_kd: bool = True,
    hint: str = "reference",
    hint_exits: Sequence[int] | None = None,
    kd_scale: str = "none",
) -> dict[str, Tensor]:
    """Be Your Own Teacher: the deepest exit teaches every shallow exit in the same pass.

    Shallow exit i: (1-α)·CE(z_i, y) + α·KL(q_C ‖ q_i) at temperature T (× T² with `kd_scale="t2"`),
    plus λ times the feature hint on the hinted exits: "reference" is the batch L2 norm between
    F_i (already passed through its training-only adapter) and F_C, "l2" the per-sample squared
    distance, "none" nothing. The deepest exit's logits and features are detached; the deepest
    exit gets plain CE. With `use_kd=False` the CE weight stays 1 (DSN plus the hint).
    """
    if hint not in HINTS:
        raise ValueError(f"Unknown hint {hint!r}; known: {', '.join(HINTS)}")
    teacher_z, teacher_f = logits[-1].detach(), features[-1].detach()
    final = F.cross_entropy(logits[-1], target)
    zero = final.new_zeros(())
    ce, kd, feat = final, zero, zero
    ce_weight = (1 - alpha) if use_kd else 1.0
    hinted = set(hinted_exits(len(logits), hint, hint_exits))
    distance = batch_l2_hint if hint == "reference" else feature_hint
    shares = []
    for i, (z, f) in enumerate(zip(logits[:-1], features[:-1], strict=True)):
        ce_i = ce_weight * F.cross_entropy(z, target)
        kd_i = alpha * distillation_kl(z, teacher_z, temperature, kd_scale) if use_kd else zero
        feat_i = feature_weight * distance(f, teacher_f) if i in hinted else zero
        ce, kd, feat = ce + ce_i, kd + kd_i, feat + feat_i
        shares.append((ce_i + kd_i + feat_i).detach())
    shares.append(final.detach())
    return _terms(ce, torch.stack(shares), kd, feat)


def dsn_loss(logits: Sequence[Tensor], target: Tensor) -> dict[str, Tensor]:
    """Deep supervision: cross-entropy at every exit, nothing else."""
    each = torch.stack([F.cross_entropy(z, target) for z in logits])
    return _terms(each.sum(), each.detach())


def standard_loss(logits: Sequence[Tensor], target: Tensor) -> dict[str, Tensor]:
    """The paper's baseline: cross-entropy at the deepest exit only."""
    ce = F.cross_entropy(logits[-1], target)
    return _terms(ce, _last_only(logits, ce))


def kd_loss(
    logits: Sequence[Tensor],
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 0.3,
    temperature: float = 3.0,
    kd_scale: str = "t2",
) -> dict[str, Tensor]:
    """Two-step distillation: a trained teacher's logits teach the student's deepest exit."""
    ce = (1 - alpha) * F.cross_entropy(logits[-1], target)
    kd = alpha * distillation_kl(logits[-1], teacher_logits.detach(), temperature, kd_scale)
    return _terms(ce, _last_only(logits, ce + kd), kd)


def compute_loss(
    method: str,
    logits: Sequence[Tensor],
    features: Sequence[Tensor],
    target: Tensor,
    teacher_logits: Tensor | None = None,
    **options: float | bool,
) -> dict[str, Tensor]:
    """Dispatch to the loss of `method` (one of `METHODS`); "ramps" trains heads with the BYOT loss."""
    if method in ("byot", "ramps"):
        return byot_loss(logits, features, target, **options)
    if method == "dsn":
        return dsn_loss(logits, target)
    if method == "standard":
        return standard_loss(logits, target)
    if method == "kd":
        if teacher_logits is None:
            raise ValueError("method 'kd' needs the teacher's logits")
        kd_opts = {k: v for k, v in options.items() if k in ("alpha", "temperature", "kd_scale")}
        return kd_loss(logits, teacher_logits, target, **kd_opts)
    raise ValueError(f"Unknown method {method!r}; known: {', '.join(METHODS)}")


def accuracy_counts(logits: Sequence[Tensor], target: Tensor) -> torch.Tensor:
    """Correct predictions per exit, then for the ensemble (mean of exit logits)."""
    preds = [z.argmax(1) for z in logits] + [torch.stack(list(logits)).mean(0).argmax(1)]
    return torch.stack([(p == target).sum() for p in preds])

"""Temperature scaling, ECE, and the threshold search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.exit_policy import answering_exits
from training.calibration import ece_of_logits, expected_calibration_error, fit_temperature, nll
from training.thresholds import NEVER, brute_force, evaluate_policy, select_thresholds


def test_temperature_scaling_lowers_nll_of_an_overconfident_model() -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (2000,), generator=g)
    logits = torch.randn(2000, 5, generator=g)
    logits[torch.arange(2000), targets] += 1.5  # right ~60 % of the time
    logits = logits * 6  # ... but far too sure of itself
    t = fit_temperature(logits, targets)
    assert t > 2
    assert nll(logits, targets, t) < nll(logits, targets) * 0.7
    assert ece_of_logits(logits, targets, t) < ece_of_logits(logits, targets) / 2


def test_ece_on_a_hand_made_example() -> None:
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    correct = torch.tensor([1, 0, 1, 1, 0, 0])
    # Bin (0.933, 1]: 2 samples, acc 0.5, conf 0.95 → gap 0.45. Bin (0.533, 0.6]: 4, acc 0.5, conf 0.55 → 0.05.
    expected = 2 / 6 * 0.45 + 4 / 6 * 0.05
    assert expected_calibration_error(conf, correct, bins=15) == pytest.approx(expected, abs=1e-6)


def _synthetic(n: int = 600, exits: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0, 1, (exits, n))
    skill = np.linspace(0.6, 0.9, exits)[:, None]
    correct = rng.uniform(0, 1, (exits, n)) < skill * 0.5 + 0.5 * conf  # confidence predicts correctness
    return conf, correct, np.linspace(1 / exits, 1.0, exits)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.03])
def test_thresholds_meet_epsilon_and_beat_a_brute_force_grid(seed: int, epsilon: float) -> None:
    conf, correct, flops = _synthetic(seed=seed)
    chosen = select_thresholds(conf, correct, flops, epsilon, z=0.0)
    assert chosen.accuracy >= correct[-1].mean() - epsilon - 1e-12
    grid = list(np.linspace(0, 1, 11))
    best = brute_force(conf, correct, flops, grid, "accuracy", epsilon)
    assert best is not None and chosen.mean_flops <= best.mean_flops + 1e-12
    assert evaluate_policy(conf, correct, flops, np.array(chosen.thresholds)) == chosen


def test_the_confidence_bound_is_stricter_than_the_estimate() -> None:
    conf, correct, flops = _synthetic(n=2000)
    plain = select_thresholds(conf, correct, flops, 0.02, z=0.0)
    bounded = select_thresholds(conf, correct, flops, 0.02, z=1.645)
    assert bounded.loss_bound <= 0.02 + 1e-12
    assert bounded.accuracy >= plain.accuracy and bounded.mean_flops >= plain.mean_flops
    exits = answering_exits(conf, np.array(bounded.thresholds))
    d = correct[-1].astype(float) - correct[exits, np.arange(2000)]
    assert bounded.loss_bound == pytest.approx(d.mean() + 1.645 * d.std(ddof=1) / np.sqrt(2000))


def test_budget_mode_respects_the_budget() -> None:
    conf, correct, flops = _synthetic()
    chosen = select_thresholds(conf, correct, flops, mode="budget", budget=0.6)
    assert chosen.mean_flops <= 0.6
    best = brute_force(conf, correct, flops, list(np.linspace(0, 1, 11)), "budget", 0.6)
    assert best is not None and chosen.accuracy >= best.accuracy


def test_policy_exit_rules() -> None:
    conf = np.array([[0.95, 0.2, 0.2], [0.5, 0.9, 0.1], [0.0, 0.0, 0.0]])
    correct = np.ones_like(conf, dtype=bool)
    r = evaluate_policy(conf, correct, np.array([0.2, 0.5, 1.0]), np.array([0.9, 0.8]))
    assert r.exit_rates == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert evaluate_policy(conf, correct, np.array([0.2, 0.5, 1.0]), np.array([NEVER, NEVER])).exit_rates[-1] == 1

"""Exits at any residual block: the network, its costs, keeping a subset, choosing which exits pay,
and the artifacts made before (one exit per stage) loading and serving unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from models import build_model
from models.artifact import ArchitectureSpec, load_artifact
from models.cost import exit_costs
from models.exit_points import keep_exits
from models.pretrained import from_torchvision
from tests.helpers import ROOT
from training.exit_selection import select_exits, served_fractions

FINE = list(range(1, 9))


@pytest.mark.parametrize("style", ["conv", "light"])
def test_an_exit_after_every_block_and_the_stage_wise_path_equals_the_forward_pass(style: str) -> None:
    model = build_model("resnet_fmnist", 10, in_channels=1, exits=FINE, exit_style=style).eval()
    assert model.num_exits == 8 and model.exit_blocks == FINE
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        full = model(x).logits
        staged = [logits for _, logits, _ in model.iter_exits(x)]
    assert all(torch.equal(a, b) for a, b in zip(full, staged, strict=True))
    costs = exit_costs(model, (1, 28, 28))
    assert costs[-1].flops_fraction == 1.0 and costs[-1].served_flops_fraction > 1.0  # every head it passed
    if style == "light":  # a light head costs a small share of the block before it
        assert costs[0].head_flops < 0.1 * costs[0].stage_flops and costs[0].flops_fraction < 0.15


def test_bad_exit_lists_are_refused_naming_the_rule() -> None:
    for exits in ([0, 8], [2, 5], [3, 3, 8], [1, 9]):
        with pytest.raises(ValueError, match="exits must be distinct block numbers from 1 to 8"):
            build_model("resnet_fmnist", 10, in_channels=1, exits=exits)


def test_keeping_some_exits_computes_exactly_what_they_computed() -> None:
    spec = ArchitectureSpec(name="resnet_fmnist", num_classes=10, in_channels=1, kwargs={"exits": FINE})
    model = spec.build().eval()
    pruned, new_spec = keep_exits(model, spec, [0, 3, 7])
    assert new_spec.kwargs["exits"] == [1, 4, 8] and pruned.num_exits == 3
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before, after = model(x).logits, pruned(x).logits
    for i, k in enumerate([0, 3, 7]):
        assert torch.equal(before[k], after[i])
    rebuilt = new_spec.build()  # what an artifact's manifest rebuilds: the same keys
    assert rebuilt.state_dict().keys() == pruned.state_dict().keys()


def test_torchvision_weights_map_exactly_with_exits_at_any_block() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=7).eval()
    model = from_torchvision("resnet18", tv.state_dict(), exits=[1, 3, 6, 8])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x).logits[-1], tv(x), atol=1e-5)


def test_served_cost_counts_every_kept_head_a_request_passes() -> None:
    stages, heads = [10, 10, 10, 10], [4, 2, 2, 1]  # full network: 40 + 1
    assert np.allclose(served_fractions(stages, heads, [0, 1, 2, 3]), [14 / 41, 26 / 41, 38 / 41, 49 / 41])
    assert np.allclose(served_fractions(stages, heads, [1, 3]), [22 / 41, 43 / 41])


def test_an_exit_that_few_requests_take_is_dropped() -> None:
    """Exit 2 answers almost nobody (its confidence is low) but its head costs everyone who reaches it."""
    rng = np.random.default_rng(0)
    n = 4000
    conf = np.stack([rng.uniform(0.5, 1.0, n), np.full(n, 0.3), rng.uniform(0.6, 1.0, n), np.ones(n)])
    correct = np.stack([conf[0] > 0.8, np.zeros(n, bool), conf[2] > 0.7, np.ones(n, bool)])
    stages, heads = [10, 10, 10, 10], [1, 5, 1, 1]
    chosen = select_exits(conf, correct, stages, heads, epsilon=0.01, z=0.0)
    assert 1 not in chosen.kept and chosen.kept[-1] == 3
    assert chosen.steps[0][0] is None and 1 in [d for d, _ in chosen.steps[1:]]
    assert chosen.result.mean_flops < chosen.steps[0][1].mean_flops


@pytest.mark.parametrize("version", ["1", "2"])
def test_artifacts_with_one_exit_per_stage_load_unchanged(version: str) -> None:
    artifact = load_artifact(ROOT / "model_store" / "fashion-mnist" / version)  # strict: every key in place
    spec = artifact.manifest.architecture
    assert "exits" not in spec.kwargs and artifact.model.num_exits == 4
    assert artifact.model.exit_blocks == [2, 4, 6, 8]

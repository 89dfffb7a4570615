"""Batch norm folded into convolutions for CPU serving: the same function, fewer operators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model
from service.engine.fusion import fold_batchnorm
from service.engine.runner import EagerRunner

SMALL = {"resnet_fmnist": (1, 28, 28), "test_tiny": (1, 28, 28)}
# name, exit style: every family, and the head styles whose convolutions carry batch norm.
CASES = [
    ("resnet_fmnist", "light"),
    ("resnet_fmnist", "conv"),
    ("resnet50", "conv"),
    ("resnext29_8x64d", "sepconv"),
    ("vgg11_bn", "conv"),
    ("wrn_16_4", "conv"),
    ("pyramidnet", "conv"),
    ("test_tiny", "conv"),
]


def _trained_stats(name: str, style: str) -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(3, *SMALL.get(name, (3, 32, 32)))
    model = build_model(name, 5, in_channels=x.shape[1], exit_style=style)
    model.train()
    with torch.no_grad():
        model(x)  # running statistics away from their initial values, so folding changes weights
    return model.eval(), x


@pytest.mark.parametrize("name,style", CASES)
def test_folding_keeps_every_exit_and_removes_the_batch_norms_it_can(name: str, style: str) -> None:
    model, x = _trained_stats(name, style)
    before_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        want = model(x).logits
        folded = fold_batchnorm(model)
        got = model(x).logits
    after_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert after_bn == before_bn - folded
    if name not in ("wrn_16_4", "pyramidnet"):  # pre-activation blocks keep the norms before their convs
        assert folded > 0 and after_bn < before_bn / 2, (folded, before_bn)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_mode_and_foreign_blocks_are_left_alone() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert fold_batchnorm(seq) == 0  # training mode: the statistics are not constants yet
    seq.eval()
    tracking_off = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert fold_batchnorm(tracking_off) == 0  # batch statistics at inference: no affine map to fold
    pre_activation = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
    assert fold_batchnorm(pre_activation) == 0
    assert fold_batchnorm(seq) == 1 and isinstance(seq[1], nn.Identity)


def test_the_cpu_runner_serves_the_folded_network_with_the_same_decisions() -> None:
    model, x = _trained_stats("resnet_fmnist", "light")
    with torch.no_grad():
        want = [torch.softmax(z, dim=1) for z in model(x).logits]
    runner = EagerRunner(model, torch.device("cpu"), [1.0] * model.num_exits, "max_softmax")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.model.stages.modules())
    h = runner.load(list(x))
    for k in range(model.num_exits):
        out = runner.run(k, h)
        torch.testing.assert_close(out.p, want[k], rtol=1e-4, atol=1e-5)
        h = out.h

"""The model zoo: shapes, gradients, stage-wise equivalence, parameter counts, costs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from models import build_model, list_models
from models.__main__ import main as models_cli
from models.cost import exit_costs

# Small inputs keep the big networks quick on two cores; PyramidNet/ResNeXt are wide, so batch 2.
SMALL = {"resnet_fmnist": (1, 28, 28)}


def _input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *SMALL.get(name, (3, 32, 32)))


@pytest.mark.parametrize("name", [n for n in list_models() if n != "pyramidnet"])
def test_forward_shapes_and_backward_reaches_every_exit(name: str) -> None:
    model = build_model(name, num_classes=7, in_channels=_input(name).shape[1])
    out = model(_input(name))
    assert len(out.logits) == model.num_exits == len(out.features)
    for z in out.logits:
        assert z.shape == (2, 7)
    sum(z.sum() for z in out.logits).backward()
    for k, head in enumerate(model.exits):
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"exit {k + 1} got no gradient"


def test_features_share_the_deepest_shape() -> None:
    out = build_model("resnet18", 10)(torch.randn(2, 3, 32, 32))
    assert {tuple(f.shape) for f in out.features} == {(2, 512)}


FAMILY_REPRESENTATIVES = ["test_tiny", "resnet_fmnist", "resnet50", "vgg11_bn", "wrn_16_4", "resnext29_8x64d"]


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
@pytest.mark.parametrize("exit_style,attention", [("conv", False), ("sepconv", True)])
def test_stagewise_path_equals_full_forward(name: str, exit_style: str, attention: bool) -> None:
    x = _input(name, batch=3)
    model = build_model(name, 5, in_channels=x.shape[1], exit_style=exit_style, attention=attention)
    model.train()
    model(x)  # move BN running stats off their initial values
    model.eval()
    with torch.no_grad():
        full = model(x).logits
        staged = [z for _, z, _ in model.iter_exits(x)]
        h = x
        manual = []
        for k in range(model.num_exits):
            h = model.run_stage(k, h)
            manual.append(model.run_exit(k, h)[0])
    for a, b, c in zip(full, staged, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_iter_exits_computes_nothing_beyond_the_yielded_exit() -> None:
    model = build_model("test_tiny", 3).eval()
    calls: list[int] = []
    for k, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda *_, k=k: calls.append(k))
    it = model.iter_exits(torch.randn(1, 3, 16, 16))
    next(it)
    assert calls == [0]
    assert [k for k, _, _ in model.iter_exits(torch.randn(1, 3, 16, 16), max_exit=2)] == [0, 1]


def _deepest_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for m in [*model.stages, model.exits[-1]] for p in m.parameters())


@pytest.mark.parametrize(
    "name,reference,expected",
    [("resnet18", torchvision.models.resnet18, 11_689_512), ("resnet50", torchvision.models.resnet50, 25_557_032)],
)
def test_deepest_resnet_path_matches_torchvision(name: str, reference, expected: int) -> None:
    model = build_model(name, 1000, stem="imagenet")
    assert _deepest_params(model) == expected == sum(p.numel() for p in reference().parameters())


def test_deepest_vgg19_bn_path_matches_torchvision_with_imagenet_classifier() -> None:
    model = build_model("vgg19_bn", 1000, classifier="imagenet")
    reference = sum(p.numel() for p in torchvision.models.vgg19_bn().parameters())
    assert _deepest_params(model) == reference == 143_678_248
    logits = model(torch.randn(1, 3, 64, 64)).logits
    assert logits[-1].shape == (1, 1000)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3), (224, 3)])
def test_any_input_size_and_channel_count(size: int, channels: int) -> None:
    stem = "imagenet" if size == 224 else "cifar"
    model = build_model("resnet18", 4, in_channels=channels, stem=stem).eval()
    with torch.no_grad():
        out = model(torch.randn(1, channels, size, size))
    assert [tuple(z.shape) for z in out.logits] == [(1, 4)] * 4


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "resnet_fmnist", "vgg16_bn", "wrn_16_4", "pyramidnet101_240", "test_tiny"]
)
def test_flops_strictly_increase_with_exit_index(name: str) -> None:
    shape = SMALL.get(name, (3, 32, 32))
    costs = exit_costs(build_model(name, 100, in_channels=shape[0]), shape)
    flops = [c.flops for c in costs]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert costs[-1].flops_fraction == pytest.approx(1.0)
    assert all(c.params > 0 for c in costs)


def test_describe_prints_a_cost_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert models_cli(["describe", "resnet_fmnist", "--num-classes", "10", "--input", "1x28x28"]) == 0
    out = capsys.readouterr().out
    assert "MFLOPs" in out and len(out.strip().splitlines()) == 2 + 4


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="Unknown model 'resnet19'; known: .*resnet18"):
        build_model("resnet19", 10)


@pytest.mark.cuda
def test_amp_forward_on_cuda() -> None:
    model = build_model("resnet18", 100).cuda().to(memory_format=torch.channels_last).eval()
    x = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert all(z.shape == (8, 100) and torch.isfinite(z.float()).all() for z in out.logits)

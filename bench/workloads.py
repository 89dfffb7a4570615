"""What `make bench` sends: Fashion-MNIST test images, and exit mixes on bigger, compute-bound networks.

The realized-efficiency workloads serve `resnet18` (3x32x32) and `resnet50` (3x224x224, ImageNet
stem) with random weights, exported here as artifacts whose thresholds never answer early, so
that each request's exit is exactly the `max_exit` it names; the `max_exit` values are drawn
with a fixed seed from an exit mix. Besides the four-exit networks, `bundled_exits_network` is
ResNet-18 with the bundled model's own exit points and heads, driven by the bundled model's exit
shares on the test set: what its exits would save on a network that is compute-bound.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from client.loadgen import fashion_mnist_pngs
from models import build_model
from models.artifact import ArchitectureSpec, ExitInfo, InputSpec, ManifestBody, read_manifest, save_artifact
from models.cost import exit_costs

# Exit shares of four-exit networks: bundled version 2's on the test set (87/5/8/0 %), and a spread-out mix.
MIXES = {"87-5-8-0": (0.87, 0.05, 0.08, 0.0), "40-30-20-10": (0.40, 0.30, 0.20, 0.10)}


@dataclass(frozen=True)
class Network:
    """A compute-bound network of the realized-efficiency measurement."""

    name: str
    model: str
    size: int
    stem: str
    num_classes: int
    max_batch: int
    run_scale: float  # runs last this many times the benchmark's run length (slow networks need more)
    mixes: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(MIXES))
    kwargs: dict[str, Any] = field(default_factory=dict)  # the network's own arguments (exit points, heads)


NETWORKS = (
    Network("resnet18", "resnet18", 32, "cifar", 100, 32, 1.0),
    Network("resnet50", "resnet50", 224, "imagenet", 1000, 4, 3.0),
)


def bundled_exits_network(bundled: Path) -> Network:
    """ResNet-18 (3x32x32) with the exit points and head style of the artifact at `bundled`, and its exit
    shares on the test set as the one mix."""
    manifest = read_manifest(bundled)
    kwargs = {k: v for k, v in manifest.architecture.kwargs.items() if k in ("exits", "exit_style")}
    test = manifest.policy.test
    if test is None:
        raise ValueError(f"{bundled} has no test-set exit shares")
    mix = {f"bundled-v{manifest.version}-mix": tuple(test.exit_rates)}
    return Network("resnet18-bundled-exits", "resnet18", 32, "cifar", 100, 32, 1.0, mix, kwargs)


def fashion_images(directory: Path, count: int) -> tuple[list[Path], list[int]]:
    """The first `count` Fashion-MNIST test images as PNG files (sorted names) and their labels."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for i, (png, label) in enumerate(fashion_mnist_pngs(count)):
        path = directory / f"{i:05d}.png"
        path.write_bytes(png)
        paths.append(path)
        labels.append(label)
    (directory.parent / f"{directory.name}-labels.json").write_text(json.dumps(labels))
    return paths, labels


def rgb_images(directory: Path, count: int, size: int) -> list[Path]:
    """Fashion-MNIST test images scaled to `size` and tinted, as RGB PNG files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (png, _) in enumerate(fashion_mnist_pngs(count)):
        gray = Image.open(io.BytesIO(png)).resize((size, size), Image.Resampling.BILINEAR)
        rgb = Image.merge("RGB", (gray, gray.point(lambda v: v * 0.8), gray.point(lambda v: 255 - v)))
        path = directory / f"{i:05d}.png"
        rgb.save(path, format="PNG")
        paths.append(path)
    return paths


def random_weight_artifact(store: Path, net: Network) -> Path:
    """`net` with seeded random weights and thresholds of 1 (never early), costs in the manifest."""
    torch.manual_seed(0)
    model = build_model(net.model, net.num_classes, in_channels=3, stem=net.stem, **net.kwargs).eval()
    costs = exit_costs(model, (3, net.size, net.size))
    exits = [
        ExitInfo(exit=c.exit, threshold=1.0, params=c.params, flops=c.flops, flops_fraction=c.flops_fraction)
        for c in costs
    ]
    spec = InputSpec(size=net.size, channels=3, color_mode="RGB", mean=[0.5] * 3, std=[0.25] * 3)
    architecture = ArchitectureSpec(
        name=net.model, num_classes=net.num_classes, in_channels=3, stem=net.stem, kwargs=net.kwargs
    )
    body = ManifestBody(
        architecture=architecture, classes=[f"class{i}" for i in range(net.num_classes)], input=spec, exits=exits
    )
    return save_artifact(model, body, store, net.name, "1")


def mix_paths(mix: tuple[float, ...], count: int = 1000, seed: int = 0) -> list[str]:
    """`count` request paths whose `max_exit` values are drawn from `mix` (shares of exits 1..n)."""
    rng = random.Random(seed)
    exits = rng.choices(range(1, len(mix) + 1), weights=mix, k=count)
    return [f"/classify?max_exit={e}" for e in exits]


def mean_flops(paths: list[str], flops_fraction: list[float]) -> float:
    """Mean FLOPs fraction of the exits `paths` force."""
    exits = [int(p.rsplit("=", 1)[1]) for p in paths]
    return sum(flops_fraction[e - 1] for e in exits) / len(exits)


OIP_HEAD = 160  # bytes of JSON before the binary image in every v2 body (padded with spaces)


def oip_bodies(directory: Path, images: list[Path]) -> list[Path]:
    """Each image as an Open Inference Protocol request with binary tensor data: a JSON head of
    OIP_HEAD bytes (so one Inference-Header-Content-Length fits all), then the length-prefixed PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies = []
    for path in images:
        png = path.read_bytes()
        element = len(png).to_bytes(4, "little") + png
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(element)},
                    }
                ],
                "outputs": [{"name": "label"}, {"name": "exit"}],
            },
            separators=(",", ":"),
        )
        assert len(head) <= OIP_HEAD, len(head)
        body = directory / path.name.replace(".png", ".bin")
        body.write_bytes(head.ljust(OIP_HEAD).encode() + element)
        bodies.append(body)
    return bodies

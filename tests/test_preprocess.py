"""The shared preprocessing equals torchvision's v2 pipeline for the same input spec, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from models.artifact import InputSpec
from models.preprocess import Preprocess


def _pipeline(spec: InputSpec) -> v2.Compose:
    size = spec.size
    geometry = [v2.Resize(spec.resize), v2.CenterCrop(size)] if spec.resize else [v2.Resize((size, size))]
    scale = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    return v2.Compose([v2.ToImage(), *geometry, *scale])


@pytest.mark.parametrize(
    "mode,image_size,spec",
    [
        ("L", (28, 28), InputSpec(size=28, channels=1, color_mode="L", mean=[0.286], std=[0.353])),
        ("L", (40, 31), InputSpec(size=28, channels=1, color_mode="L", mean=[0.286], std=[0.353])),
        ("RGB", (32, 32), InputSpec(size=32, channels=3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])),
        ("RGB", (300, 225), InputSpec(size=224, channels=3, resize=256, mean=[0.485, 0.456, 0.406],
                                      std=[0.229, 0.224, 0.225])),
    ],
)  # fmt: skip
def test_preprocess_equals_the_v2_pipeline(mode: str, image_size: tuple[int, int], spec: InputSpec) -> None:
    rng = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, (image_size[1], image_size[0], channels), dtype=np.uint8).squeeze()
    image = Image.fromarray(pixels, mode)
    ours, theirs = Preprocess(spec)(image), _pipeline(spec)(image)
    assert ours.shape == (channels, spec.size, spec.size)
    torch.testing.assert_close(ours, theirs.as_subclass(torch.Tensor), rtol=0, atol=0)

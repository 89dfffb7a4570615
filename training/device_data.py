"""The tensor data path: a data set that fits in memory, held on the training device, batched and augmented
there with whole-batch tensor ops (airbench's approach), instead of a DataLoader's per-image Python.

The uint8 images go to the device once. Each epoch draws a permutation and every augmentation from
one generator seeded by (seed, epoch), so a run is reproducible and a resume at an epoch boundary
is exact. The augmentations mean what the DataLoader path's torchvision transforms mean
(training/data.py, `_tensor_transforms`; a test compares their statistics):

* crop (`standard`): zero padding of 2 pixels (28-pixel images) or 4, then a crop at a uniformly
  drawn offset, i.e. a random translation;
* flip (`standard`): horizontal, with probability 1/2;
* erasing (`erasing`): with probability 1/2, a rectangle of 2–33 % of the image with aspect ratio
  0.3–3.3 (log-uniform) set to 0 after normalisation, as `RandomErasing`.

AutoAugment has no batched form here: `--augment autoaugment…` keeps the DataLoader path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from training.data import TensorImages


@dataclass
class DeviceData:
    """Images (uint8 N×C×H×W) and labels on `device`, with the recipe to batch and augment them."""

    images: Tensor
    labels: Tensor
    mean: Tensor
    std: Tensor
    pad: int = 0
    flip: bool = False
    erasing: bool = False

    @property
    def size(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, seed: int, epoch: int, drop_last: bool = True
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled, augmented, normalised batches (float32 on the device)."""
        g = torch.Generator(device=self.images.device).manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.size, generator=g, device=self.images.device)
        end = self.size - self.size % batch_size if drop_last else self.size
        for start in range(0, end, batch_size):
            idx = order[start : start + batch_size]
            yield self.augment(self.images[idx], g), self.labels[idx]

    def in_order(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole set in order, normalised, not augmented (evaluation)."""
        for start in range(0, self.size, batch_size):
            yield (
                self.normalise(self.images[start : start + batch_size].float().div_(255)),
                self.labels[start : start + batch_size],
            )

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def augment(self, batch: Tensor, g: torch.Generator) -> Tensor:
        x = batch.float().div_(255)
        if self.pad:
            x = translate(x, self.pad, g)
        if self.flip:
            flipped = torch.rand(len(x), generator=g, device=x.device) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(3), x)
        x = self.normalise(x)
        if self.erasing:
            x = erase(x, g)
        return x


def translate(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    """Zero-pad by `pad` and crop back to the size at a uniform offset, per image (RandomCrop with padding)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def erase(x: Tensor, g: torch.Generator, p: float = 0.5) -> Tensor:
    """RandomErasing per image: with probability `p`, a rectangle of 2–33 % of the area (aspect 0.3–3.3) set to 0."""
    n, _, h, w = x.shape
    dev = x.device
    area = (0.02 + 0.31 * torch.rand(n, generator=g, device=dev)) * h * w
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(n, generator=g, device=dev))
    eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
    ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
    top = (torch.rand(n, generator=g, device=dev) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=g, device=dev) * (w - ew + 1)).long()
    on = torch.rand(n, generator=g, device=dev) < p
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    inside_y = (ys[None, :] >= top[:, None]) & (ys[None, :] < (top + eh)[:, None])
    inside_x = (xs[None, :] >= left[:, None]) & (xs[None, :] < (left + ew)[:, None])
    mask = (inside_y[:, :, None] & inside_x[:, None, :] & on[:, None, None])[:, None]
    return x.masked_fill(mask, 0.0)


def device_data(
    dataset: Dataset, device: torch.device, mean: list[float], std: list[float], augment: str
) -> DeviceData:
    """A TensorImages set (or a Subset of one) as DeviceData with the `augment` recipe; ValueError otherwise."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImages):
        idx = torch.as_tensor(dataset.indices)
        images, labels = dataset.dataset.images[idx], dataset.dataset.labels[idx]
    elif isinstance(dataset, TensorImages):
        images, labels = dataset.images, dataset.labels
    else:
        raise ValueError("the tensor data path needs a data set held in memory (fashion-mnist, cifar, synthetic)")
    if augment.startswith("autoaugment"):
        raise ValueError("AutoAugment has no batched form: use --data-path loader")
    size = images.shape[-1]
    standard = augment in ("standard", "erasing")
    return DeviceData(
        images=images.to(device),
        labels=labels.to(device),
        mean=torch.tensor(mean, device=device).view(1, -1, 1, 1),
        std=torch.tensor(std, device=device).view(1, -1, 1, 1),
        pad=(2 if size <= 28 else 4) if standard else 0,
        flip=standard,
        erasing=augment == "erasing",
    )

"""Datasets, transforms and the held-out validation split.

Every dataset comes back as a `DataBundle`: train / val / test datasets plus what the artifact
needs to describe the input (class names, channels, size, mean/std). The validation split is
held out of the training set with its own fixed seed; the test set is only ever reported.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
from torchvision.transforms import v2

from models.artifact import InputSpec
from models.preprocess import Preprocess, load_image_file, to_mode

log = logging.getLogger("anytime.train")
FETCH_HINT = "`apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist/)."
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "unlabelled", "synthetic")
UNLABELLED = -1  # the label of an image without one: the final exit's prediction stands in (`targets_of`)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
AUGMENTATIONS = ("none", "standard", "erasing", "autoaugment", "autoaugment+erasing")


class DataError(RuntimeError):
    """The data set cannot be found or read; the message says where it looked and what to do."""


def _read(path: Path | None) -> torch.Tensor:
    """An IDX file's tensor (torchvision's reader; a gzipped file is unpacked into a temporary directory)."""
    if path is None:
        raise DataError("IDX file not found")
    try:
        if path.suffix != ".gz":
            return read_sn3_pascalvincent_tensor(str(path))
        with tempfile.TemporaryDirectory(prefix="anytime-idx-") as tmp:
            plain = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, plain.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            return read_sn3_pascalvincent_tensor(str(plain))
    except (OSError, AssertionError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path} is not a readable IDX file: {exc}") from exc


@dataclass
class DataBundle:
    """Train/val/test splits and the input description that export writes into the manifest."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    resize: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TensorImages(Dataset):
    """Images held in memory as a uint8 N×C×H×W tensor, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])

    def with_transform(self, transform: v2.Transform) -> TensorImages:
        return TensorImages(self.images, self.labels, transform)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in ("", ".gz"):
            p = directory / sub / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def fashion_mnist_dir(data_dir: str | None, allow_download: bool) -> Path:
    """Where the Fashion-MNIST IDX files are: --data-dir, $ANYTIME_DATA_DIR, Debian's package, download.
    A directory that was named (--data-dir) must hold them: a typo is an error, never a fall-back to
    another copy."""
    if data_dir and not (_find_idx(Path(data_dir), "train-images-idx3-ubyte") and
                         _find_idx(Path(data_dir), "t10k-labels-idx1-ubyte")) and not allow_download:  # fmt: skip
        raise DataError(
            f"--data-dir {data_dir}: no Fashion-MNIST IDX files there (train-images-idx3-ubyte[.gz], …). Fix one "
            f"of: pass --data-dir DIR holding the IDX files; set ANYTIME_DATA_DIR; or {FETCH_HINT}"
        )
    candidates = [Path(p) for p in (data_dir, os.environ.get("ANYTIME_DATA_DIR")) if p]
    candidates.append(DEBIAN_FASHION_MNIST)
    for c in candidates:
        if _find_idx(c, "train-images-idx3-ubyte") and _find_idx(c, "t10k-labels-idx1-ubyte"):
            return c
    root = Path(data_dir or os.environ.get("ANYTIME_DATA_DIR") or Path.home() / ".cache" / "anytime")
    if allow_download:
        try:
            datasets.FashionMNIST(str(root), train=True, download=True)
            datasets.FashionMNIST(str(root), train=False, download=True)
            return root
        except Exception as exc:  # network errors come in many types
            reason = f"download failed: {exc}"
    else:
        reason = "download disabled"
    raise DataError(
        "Fashion-MNIST not found. Looked in: "
        + ", ".join(str(c) for c in candidates)
        + f" ({reason}). Fix one of: pass --data-dir DIR holding the IDX files; set ANYTIME_DATA_DIR; or {FETCH_HINT}"
    )


def _tensor_transforms(
    train: bool, size: int, mean: list[float], std: list[float], augment: str = "none"
) -> v2.Transform:
    """uint8 C×H×W tensor → normalised float; for training, the `augment` recipe (AUGMENTATIONS).

    "standard": random crop (padding 2 for 28-pixel images, 4 otherwise) and horizontal flip;
    "erasing" adds random erasing; "autoaugment" adds torchvision's CIFAR-10 AutoAugment policy.
    """
    if augment not in AUGMENTATIONS:
        raise DataError(f"Unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
    steps: list[v2.Transform] = []
    if train and augment != "none":
        steps += [v2.RandomCrop(size, padding=2 if size <= 28 else 4), v2.RandomHorizontalFlip()]
        if augment.startswith("autoaugment"):
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and augment.endswith("erasing"):
        steps.append(v2.RandomErasing())
    return v2.Compose(steps)


def _split(train_full: TensorImages, val_size: int, seed: int, eval_tf: v2.Transform) -> tuple[Dataset, Dataset]:
    if not 0 < val_size < len(train_full):
        raise DataError(f"val_size must be between 1 and {len(train_full) - 1}, got {val_size}")
    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(seed)).tolist()
    train = Subset(train_full, order[val_size:])
    val = Subset(train_full.with_transform(eval_tf), order[:val_size])
    return train, val


def load_fashion_mnist(
    data_dir: str | None, val_size: int, split_seed: int, allow_download: bool, augment: str = "standard"
) -> DataBundle:
    """Fashion-MNIST from its IDX files; 28x28 grayscale, 10 classes."""
    root = fashion_mnist_dir(data_dir, allow_download)

    def part(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = _read(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        return images.unsqueeze(1).contiguous(), labels.long()

    mean, std = [0.2860], [0.3530]
    eval_tf = _tensor_transforms(False, 28, mean, std)
    train_full = TensorImages(*part("train"), _tensor_transforms(True, 28, mean, std, augment))
    train, val = _split(train_full, val_size, split_seed, eval_tf)
    test = TensorImages(*part("t10k"), eval_tf)
    return DataBundle("fashion-mnist", train, val, test, FASHION_MNIST_CLASSES, 1, 28, mean, std)


CIFAR_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


def load_cifar(name: str, data_dir: str | None, val_size: int, split_seed: int, augment: str) -> DataBundle:
    """CIFAR-10/100 from the standard python-pickle directory (never downloaded)."""
    root = data_dir or os.environ.get("ANYTIME_DATA_DIR")
    if not root:
        raise DataError(f"{name} needs --data-dir (or ANYTIME_DATA_DIR) pointing at the extracted python version")
    (train_x, train_y), (test_x, test_y), classes = _read_cifar(Path(root), name)
    mean, std = CIFAR_STATS[name]
    eval_tf = _tensor_transforms(False, 32, mean, std)
    train_full = TensorImages(train_x, train_y, _tensor_transforms(True, 32, mean, std, augment))
    train, val = _split(train_full, val_size, split_seed, eval_tf)
    return DataBundle(name, train, val, TensorImages(test_x, test_y, eval_tf), classes, 3, 32, mean, std)


CIFAR_FILES = {  # the python version's directory, its training and test batches, its meta file and label keys
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}  # fmt: skip


Labelled = tuple[torch.Tensor, torch.Tensor]  # uint8 images N×C×H×W, labels


def _read_cifar(root: Path, name: str) -> tuple[Labelled, Labelled, list[str]]:
    """The standard python-pickle format read directly (`root` is the extracted directory or its parent):
    uint8 N×3×32×32 images and labels of the training and test batches, and the class names. Unlike
    torchvision's reader it checks no checksums, so a subset in the same format (a smoke test's) reads too."""
    folder, train_files, test_files, meta, label_key, names_key = CIFAR_FILES[name]
    base = root / folder if (root / folder).is_dir() else root

    def load(file: str) -> dict:
        try:
            with (base / file).open("rb") as f:
                return pickle.load(f, encoding="bytes")
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise DataError(f"{name}: {base / file} is not a readable batch of the python version: {exc}") from exc

    def batches(files: list[str]) -> Labelled:
        parts = [load(f) for f in files]
        x = torch.cat([torch.as_tensor(p[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32) for p in parts])
        return x, torch.tensor([y for p in parts for y in p[label_key]])

    classes = [n.decode() for n in load(meta)[names_key]]
    return batches(train_files), batches(test_files), classes


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
STATS_IMAGES = 2000  # training images that `normalization: computed` averages over (a random sample)


@dataclass(frozen=True)
class FolderOptions:
    """How an image folder is read: the input side, its normalisation, and what to do with bad files."""

    size: int = 224
    mean: list[float] | None = None  # with `std`: given; else by `normalization`
    std: list[float] | None = None
    normalization: str = "imagenet"  # imagenet: ImageNet's statistics; computed: the training split's
    skip_bad_images: bool = False  # a file that is no readable image is left out and listed, not an error
    channels: int = 3  # unlabelled images: 1 reads them grayscale (a model trained on grayscale input)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


def _folder_train_transform(
    size: int, mean: list[float], std: list[float], augment: str, mode: str = "RGB"
) -> v2.Transform:
    """A training photo: "none" as evaluation (resize, centre crop); otherwise torchvision's recipe for
    photos (random resized crop and flip), "erasing" adding random erasing and "autoaugment" ImageNet's
    AutoAugment policy."""
    if augment not in AUGMENTATIONS:
        raise DataError(f"Unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return Preprocess(InputSpec(size=size, channels=len(mean), color_mode=mode, resize=int(size * 256 / 224),
                                    mean=mean, std=std))  # fmt: skip
    steps: list[Any] = [v2.Lambda(partial(to_mode, mode=mode)), v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    if augment.startswith("autoaugment"):
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment.endswith("erasing"):
        steps.append(v2.RandomErasing())
    return v2.Compose(steps)


def load_imagefolder(
    data_dir: str | None,
    val_size: int,
    split_seed: int,
    augment: str = "standard",
    options: FolderOptions | None = None,
) -> DataBundle:
    """`train/` and `val/` class folders (ImageNet layout); `val/` is the reported test set.

    Training: the `augment` recipe for photos (`_folder_train_transform`). Evaluation: exactly what the
    server applies to a photo (models/preprocess.py): RGB, shorter side to 256/224 of the input size,
    centre crop, the normalisation. Every image is read upright by its EXIF orientation.
    """
    o = options or FolderOptions()
    if not data_dir or not (Path(data_dir) / "train").is_dir() or not (Path(data_dir) / "val").is_dir():
        raise DataError(f"imagefolder needs --data-dir with train/ and val/ class folders, got {data_dir!r}")
    root = Path(data_dir)
    classes = _folder_classes(root)
    resize = int(o.size * 256 / 224)
    bad: set[str] = set()

    def folder(split: str, transform: Callable[[Image.Image], Any]) -> datasets.ImageFolder:
        ds = _OneMapping(str(root / split), classes, transform=transform, loader=_checked_image)
        if bad:
            ds.samples = ds.imgs = [s for s in ds.samples if s[0] not in bad]
            ds.targets = [y for _, y in ds.samples]
        return ds

    if o.skip_bad_images:
        bad.update(_bad_images([folder("train", _identity), folder("val", _identity)]))
    plain = folder("train", _identity)
    if not 0 < val_size < len(plain):
        raise DataError(f"val_size must be between 1 and {len(plain) - 1} for this folder, got {val_size}")
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(split_seed)).tolist()
    mean, std = _normalisation(o, plain, order[val_size:], resize)
    eval_tf = Preprocess(InputSpec(size=o.size, channels=3, color_mode="RGB", resize=resize, mean=mean, std=std))
    train_full = folder("train", _folder_train_transform(o.size, mean, std, augment))
    return DataBundle(
        "imagefolder",
        Subset(train_full, order[val_size:]),
        Subset(folder("train", eval_tf), order[:val_size]),
        folder("val", eval_tf),
        list(train_full.classes),
        3,
        o.size,
        mean,
        std,
        resize=resize,
        extra={"bad_images": sorted(bad)},
    )


class ImageFiles(Dataset):
    """Image files without labels: each sample is (image, UNLABELLED)."""

    def __init__(self, paths: list[str], transform: Callable[[Image.Image], Any]) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(_checked_image(self.paths[i])), UNLABELLED


def load_unlabelled(
    data_dir: str | None,
    val_size: int,
    split_seed: int,
    classes: list[str],
    augment: str = "standard",
    options: FolderOptions | None = None,
) -> DataBundle:
    """Every image file under `data_dir` (any layout, no labels), read as an image folder is; `val_size`
    of them for validation and as many for the test report, the rest for training. `classes` are the
    model's (what its final exit predicts), which stands in for the labels."""
    o = options or FolderOptions()
    root = Path(data_dir) if data_dir else None
    if root is None or not root.is_dir():
        raise DataError(f"--unlabelled needs a directory of images, got {data_dir!r}")
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if o.skip_bad_images:
        bad = set(_bad_images([_Listed(paths)]))
        paths = [p for p in paths if p not in bad]
    else:
        bad = set()
    if len(paths) < 2 * val_size + 1:
        raise DataError(f"{root} holds {len(paths)} images; --val-size {val_size} needs at least {2 * val_size + 1}")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(split_seed)).tolist()
    shuffled = [paths[i] for i in order]
    resize = int(o.size * 256 / 224)
    mean, std = _normalisation(o, _Listed(shuffled), list(range(2 * val_size, len(shuffled))), resize)
    spec = InputSpec(size=o.size, channels=o.channels, color_mode=o.mode, resize=resize, mean=mean, std=std)
    eval_tf = Preprocess(spec)
    return DataBundle(
        "unlabelled",
        ImageFiles(shuffled[2 * val_size :], _folder_train_transform(o.size, mean, std, augment, o.mode)),
        ImageFiles(shuffled[:val_size], eval_tf),
        ImageFiles(shuffled[val_size : 2 * val_size], eval_tf),
        list(classes),
        o.channels,
        o.size,
        mean,
        std,
        resize=resize,
        extra={"bad_images": sorted(bad)},
    )


class _Listed:
    """File paths in the shape `_bad_images` and `_channel_stats` read (an ImageFolder's `samples`)."""

    def __init__(self, paths: list[str]) -> None:
        self.samples = [(p, UNLABELLED) for p in paths]


def targets_of(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The labels to score against: `targets`, or for unlabelled samples the final exit's predictions
    (so accuracies read as agreement with the final exit)."""
    if len(targets) and bool((targets == UNLABELLED).all()):
        return logits[-1].argmax(1)
    return targets


def _normalisation(o: FolderOptions, source: Any, train: list[int], resize: int) -> tuple[list[float], list[float]]:
    """The mean and std images are normalised with: given, computed from the training images of `source`
    (also for grayscale, which ImageNet's statistics do not fit), or ImageNet's; one value per channel."""
    if o.mean is not None and o.std is not None:
        mean, std = list(o.mean), list(o.std)
    elif o.normalization == "computed" or o.channels != 3:
        mean, std = _channel_stats(source, train, o.size, resize, o.mode)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if len(mean) != o.channels or len(std) != o.channels or any(v <= 0 for v in std):
        raise DataError(
            f"the input has {o.channels} channels: --mean and --std take {o.channels} values each (std > 0), "
            f"got {mean} and {std}"
        )
    return mean, std


def _identity(image: Image.Image) -> Image.Image:
    return image


def _bad_images(folders: list[datasets.ImageFolder]) -> list[str]:
    """Every file of `folders` that is no readable image (each decoded once, in threads), sorted."""

    def unreadable(path: str) -> bool:
        try:
            _checked_image(path)
        except DataError:
            return True
        return False

    paths = [p for f in folders for p, _ in f.samples]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        flags = list(pool.map(unreadable, paths))
    found = sorted(p for p, b in zip(paths, flags, strict=True) if b)
    if found:
        log.warning("left out %d files that are no readable image (the run lists them in bad_images.txt)", len(found))
    return found


def _channel_stats(
    ds: Any, indices: list[int], size: int, resize: int, mode: str = "RGB"
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to STATS_IMAGES training images as evaluation reads them (in
    `mode`, resized and centre-cropped, scaled to 0–1)."""
    c = 1 if mode == "L" else 3
    read = Preprocess(InputSpec(size=size, channels=c, color_mode=mode, resize=resize, mean=[0.0] * c, std=[1.0] * c))
    total, total_sq, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for i in indices[:STATS_IMAGES]:
        x = read(_checked_image(ds.samples[i][0])).double()
        total += x.sum(dim=(1, 2))
        total_sq += (x * x).sum(dim=(1, 2))
        n += x.shape[1] * x.shape[2]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt().clamp_min(1 / 255)  # a flat channel: one grey level
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def _folder_classes(root: Path) -> list[str]:
    """The class names of `train/`, the one mapping every split uses: `val/` may not have a class that
    `train/` lacks (every later label would shift); a class of `train/` missing from `val/` is a warning."""

    def names(split: str) -> set[str]:
        return {d.name for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith(".")}

    train, val = names("train"), names("val")
    if extra := sorted(val - train):
        raise DataError(f"{root / 'val'} has classes that train/ lacks: {', '.join(extra)}")
    if missing := sorted(train - val):
        log.warning("%s has no images of classes %s: they are trained but not tested", root / "val", ", ".join(missing))
    return sorted(train)


class _OneMapping(datasets.ImageFolder):
    """An ImageFolder whose classes are given (train/'s), not read from its own directory."""

    def __init__(self, root: str, classes: list[str], **kwargs: Any) -> None:
        self._given = classes
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = {d.name for d in Path(directory).iterdir() if d.is_dir()}
        mapping = {c: i for i, c in enumerate(self._given) if c in present}
        return list(self._given), mapping


def _checked_image(path: str) -> Image.Image:
    """A training image, or a DataError naming the file that is not one."""
    try:
        return load_image_file(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path} is not a readable image: {exc}") from exc


def load_synthetic(num_classes: int = 4, size: int = 16, channels: int = 3, n: int = 256, seed: int = 0) -> DataBundle:
    """Random images whose class sets their mean brightness, so a network can learn them (for tests)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    base = (labels.float() + 0.5) / num_classes * 200
    noise = torch.randn(n, channels, size, size, generator=g) * 25
    images = (base.view(-1, 1, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    mean, std = [0.5] * channels, [0.25] * channels
    tf = _tensor_transforms(False, size, mean, std)
    full = TensorImages(images, labels, tf)
    quarter = n // 4
    return DataBundle(
        "synthetic",
        Subset(full, range(2 * quarter, n)),
        Subset(full, range(quarter)),
        Subset(full, range(quarter, 2 * quarter)),
        [f"class{i}" for i in range(num_classes)],
        channels,
        size,
        mean,
        std,
    )


def load_data(
    name: str,
    data_dir: str | None = None,
    val_size: int = 5000,
    split_seed: int = 0,
    augment: str = "standard",
    allow_download: bool = True,
    folder: FolderOptions | None = None,
    classes: list[str] | None = None,
) -> DataBundle:
    """Load one of `DATASETS` by name (`folder`: how an image folder, or unlabelled images, are read;
    `classes`: the model's, for unlabelled images)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, val_size, split_seed, allow_download, augment)
    if name in CIFAR_STATS:
        return load_cifar(name, data_dir, val_size, split_seed, augment)
    if name == "imagefolder":
        return load_imagefolder(data_dir, val_size, split_seed, augment, folder)
    if name == "unlabelled":
        if not classes:
            raise DataError("unlabelled images need the model's classes")
        return load_unlabelled(data_dir, val_size, split_seed, classes, augment, folder)
    if name == "synthetic":
        return load_synthetic()
    raise DataError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}")

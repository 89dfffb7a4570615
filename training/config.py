"""The trainer's configuration: defaults < ANYTIME_* environment < YAML file < command-line flags."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.data import AUGMENTATIONS, DATASETS, FolderOptions
from training.losses import METHODS


class TrainConfig(BaseSettings):
    """Everything one training run needs; saved as `config.yaml` next to the run."""

    model_config = SettingsConfigDict(env_prefix="ANYTIME_", extra="forbid")

    # What to train.
    model: str = Field("resnet_fmnist", description="registered model name (python -m models list)")
    stem: Literal["cifar", "imagenet"] | None = Field(
        None, description="network stem; default: imagenet for inputs larger than 64 px, else cifar"
    )
    exit_style: Literal["conv", "sepconv", "light"] = Field("conv", description="exit head style")
    exits: list[int] | None = Field(
        None,
        description="ResNets: 1-based blocks to put an exit after (the last block's is the final exit); "
        "default: one exit per stage",
    )
    attention: bool = Field(False, description="attention gate before each shallow exit (TPAMI variant)")
    method: str = Field("byot", description=f"one of {', '.join(METHODS)}")
    teacher: str | None = Field(None, description="kd only: teacher checkpoint (.pt) or artifact directory")
    init: str | None = Field(None, description="start from this checkpoint (.pt) or artifact directory (ramps)")
    freeze_backbone: bool = Field(True, description="ramps: train the shallow exit heads only (else fine-tune all)")
    # Loss options (BYOT reference-code defaults).
    alpha: float = Field(0.3, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(3.0, gt=0, description="distillation temperature T")
    kd_scale: Literal["none", "t2"] | None = Field(
        None, description="KD term times T² (t2) or not (none); default: none for byot/ramps (reference), t2 for kd"
    )
    kd_warmup_epochs: int = Field(0, ge=0, description="byot/ramps: ramp the KD weight from 0 to alpha over N epochs")
    feature_weight: float = Field(0.03, ge=0, description="weight λ of the feature hint")
    hint: Literal["reference", "l2", "none"] = Field(
        "reference", description="feature hint: reference (adapter + batch L2 norm), l2 (squared, per sample), none"
    )
    hint_exits: list[int] | None = Field(
        None, description="1-based shallow exits that get the hint (default: reference all but the last; l2 all)"
    )
    use_kd: bool = Field(True, description="byot: distil the deepest exit into the shallow ones")
    # Data.
    dataset: str = Field("fashion-mnist", description=f"one of {', '.join(DATASETS)}")
    data_dir: str | None = Field(None, description="where the data set lives")
    val_size: int = Field(5000, gt=0, description="images held out of the training set for validation")
    split_seed: int = Field(0, description="seed of the validation split (kept apart from the training seed)")
    augment: Literal[AUGMENTATIONS] = Field(
        "standard", description="none; standard: random crop + flip; erasing adds random erasing; autoaugment..."
    )
    image_size: int = Field(224, ge=8, le=1024, description="imagefolder: side of the square input, pixels")
    mean: list[float] | None = Field(
        None, description="imagefolder: per-channel mean (with --std); default: --normalization"
    )
    std: list[float] | None = Field(None, description="imagefolder: per-channel std (with --mean)")
    normalization: Literal["imagenet", "computed"] = Field(
        "imagenet",
        description="imagefolder without --mean/--std: ImageNet's statistics (what pretrained weights expect) "
        "or computed from the training split",
    )
    unlabelled: str | None = Field(
        None,
        description="a directory of images without labels: ramps trains the exits of --init by distillation "
        "from its own final exit (alpha 1, no cross-entropy); accuracies are agreement with the final exit",
    )
    classes: list[str] | None = Field(
        None, description="--unlabelled: the --init model's class names in its output order (default: its own)"
    )
    skip_bad_images: bool = Field(
        False, description="imagefolder: leave out files that are no readable image (listed in bad_images.txt)"
    )
    allow_download: bool = Field(True, description="fashion-mnist: fall back to torchvision's download")
    # Optimisation.
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0, description="global batch size (split across DDP ranks)")
    lr: float = Field(0.1, gt=0, description="learning rate at batch 128 (scaled with --lr-scaling linear)")
    lr_scaling: Literal["linear", "none"] = Field(
        "linear", description="linear: lr × batch_size / 128 (Goyal et al.); none: lr as given"
    )
    warmup_epochs: int | None = Field(
        None, ge=0, description="linear lr warm-up; default: none at batch 128 or less, else min(5, epochs / 10)"
    )
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["multistep", "cosine"] = "multistep"
    milestones: list[float] = Field([0.5, 0.75], description="multistep: fractions of the epochs where lr drops")
    gamma: float = Field(0.1, description="multistep: lr factor at each milestone")
    seed: int = 0
    max_steps: int | None = Field(None, description="cap on steps per epoch (smoke runs)")
    # Hardware.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="auto: bf16 on CUDA, off on CPU")
    channels_last: bool = Field(True, description="CUDA only")
    compile: bool = Field(False, description="torch.compile the model")
    threads: int | None = Field(None, description="CPU: torch.set_num_threads")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    data_path: Literal["auto", "tensor", "loader"] = Field(
        "auto",
        description="tensor: data set on the device, batched augmentation; loader: DataLoader; "
        "auto: tensor on CUDA for in-memory data sets",
    )
    # Output.
    out_dir: str = Field("runs/run", description="run directory: checkpoints, logs, config, results")
    resume: bool = Field(False, description="continue from out_dir/last.pt")
    stop_after: int | None = Field(None, gt=0, description="end this invocation after N epochs (resume later)")
    progress: bool | None = Field(None, description="tqdm progress bars; default: when stderr is a terminal")
    tensorboard: bool = Field(False, description="also log every epoch's figures for TensorBoard (OUT_DIR/tensorboard)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; known: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _unlabelled(self) -> TrainConfig:
        if self.unlabelled is not None:
            if self.method != "ramps":
                raise ValueError("--unlabelled trains exit heads of a --init model: it needs --method ramps")
            self.dataset, self.data_dir, self.alpha = "unlabelled", self.unlabelled, 1.0
        elif self.dataset == "unlabelled":
            raise ValueError("give the images with --unlabelled DIR")
        return self

    @model_validator(mode="after")
    def _mean_with_std(self) -> TrainConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("--mean and --std go together")
        return self

    def folder_options(self) -> FolderOptions:
        """How an image folder is read (the other datasets ignore it)."""
        return FolderOptions(self.image_size, self.mean, self.std, self.normalization, self.skip_bad_images)

    @model_validator(mode="after")
    def _ramps_needs_init(self) -> TrainConfig:
        if self.method == "ramps" and not self.init:
            raise ValueError("method 'ramps' needs --init (a trained checkpoint .pt or an artifact directory)")
        return self

    @property
    def effective_kd_scale(self) -> str:
        return self.kd_scale or ("t2" if self.method == "kd" else "none")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(DATASETS)}")
        return v

    def save(self, path: Path, provenance: dict[str, Any] | None = None) -> None:
        """The resolved settings as YAML (what `--config` reads back), headed by where the run came from as
        comments (so that the file still reads back as settings)."""
        head = "".join(f"# {k}: {v}\n" for k, v in (provenance or {}).items())
        path.write_text(head + yaml.safe_dump(self.model_dump(), sort_keys=False))


def _arg_type(annotation: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a field annotation, for argparse."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _arg_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    if origin is Literal:
        return str, False
    return annotation, False


def build_parser(
    settings: type[BaseSettings] = TrainConfig,
    prog: str = "anytime-train",
    description: str = "Train a self-distilled multi-exit network.",
    positional: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """A flag per field of `settings` (`--batch-size 64`, `--no-use-kd`); `positional` fields are arguments."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in settings.model_fields.items():
        flag = name if name in positional else "--" + name.replace("_", "-")
        kind, is_list = _arg_type(field.annotation)
        help_text = field.description or ""
        if name in positional:
            parser.add_argument(flag, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif is_list:
            parser.add_argument(flag, type=kind, nargs="+", default=None, help=help_text)
        else:
            choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else None
            parser.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Resolve flags over the YAML file over the environment over the defaults."""
    parser = build_parser()
    parser.add_argument("--config", type=Path, help="YAML file of settings (flags override it)")
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config")
    if config_file is not None:
        values.update(yaml.safe_load(config_file.read_text()) or {})
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def settings_error(exc: ValidationError) -> str:
    """A pydantic validation error as one line: `field: reason; field: reason`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)

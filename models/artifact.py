"""The versioned model artifact that training writes and the server reads.

``<store>/<name>/<version>/`` holds ``weights.safetensors`` and ``manifest.json`` (plus the
export report). The manifest is a typed pydantic model (`Manifest`); everything reads its
attributes. Loading validates the manifest, rebuilds the network from it alone, verifies the
weights' sha256 and never unpickles anything. Saving writes a hidden temporary directory and
renames it into place, so a half-written artifact is never visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.confidence import Measure
from models.multi_exit import MultiExitNet
from models.registry import Stem, build_model

SCHEMA_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Keys that later versions of this schema may add are ignored by older readers, never rejected.
_SCHEMA = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, tampered with or of an unknown schema."""


class ArchitectureSpec(BaseModel):
    """The constructor arguments that rebuild a registered network (checkpoints carry it too)."""

    model_config = _SCHEMA
    name: str
    num_classes: int = Field(gt=0)
    in_channels: int = Field(gt=0)
    stem: Stem = "cifar"
    kwargs: dict[str, Any] = {}

    def build(self) -> MultiExitNet:
        """A fresh (untrained) network of this architecture."""
        return build_model(self.name, self.num_classes, self.in_channels, self.stem, **self.kwargs)


class InputSpec(BaseModel):
    """How an image must be preprocessed for the network (what the server applies)."""

    model_config = _SCHEMA
    size: int = Field(gt=0, description="side of the square input, pixels")
    channels: int = Field(gt=0)
    color_mode: Literal["L", "RGB"] = "RGB"
    resize: int | None = Field(None, gt=0, description="resize the shorter side to this, then centre-crop `size`")
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values, one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class StageLatency(BaseModel):
    """Median milliseconds of one stage and of its exit head, at one batch size."""

    model_config = _SCHEMA
    stage_ms: float = Field(ge=0)
    head_ms: float = Field(ge=0)


class ExitInfo(BaseModel):
    """One exit: calibration, threshold, cost, latency profile and measured quality."""

    model_config = _SCHEMA
    exit: int = Field(ge=1, description="1-based")
    temperature: float = Field(1.0, gt=0)
    threshold: float = Field(ge=0, description="confidence needed to answer here; 1 or more: never early")
    params: int | None = None
    flops: int | None = None
    flops_fraction: float | None = None
    served_flops_fraction: float | None = Field(
        None, description="answering here as served: this path plus every earlier exit head, of the full network"
    )
    head_flops: int | None = None
    latency_ms: dict[str, StageLatency] = Field({}, description="by batch size")
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    val_ece_before: float | None = None
    val_ece_after: float | None = None
    expected_agreement: float | None = Field(
        None, description="validation share of the samples answered here that the final exit labels alike"
    )


class PolicyOutcome(BaseModel):
    """What a threshold vector gives on one split."""

    model_config = _SCHEMA
    accuracy: float = Field(description="%")
    mean_flops_fraction: float
    exit_rates: list[float]
    loss_bound_pp: float = 0.0


class SweepPoint(BaseModel):
    model_config = _SCHEMA
    epsilon_pp: float
    thresholds: list[float]
    val: PolicyOutcome
    test: PolicyOutcome


class SelectionStep(BaseModel):
    """One step of exit selection: the exit dropped (a block number; none for the start) and what followed."""

    dropped_block: int | None = None
    kept_blocks: list[int]
    val: PolicyOutcome


class ExitSelection(BaseModel):
    """Which of the trained exits the artifact serves, and why (training/exit_selection.py)."""

    trained_blocks: list[int] = Field(description="the block after which each trained exit sat (1-based)")
    kept_blocks: list[int]
    steps: list[SelectionStep]


class PolicyChoice(BaseModel):
    """How the thresholds were chosen, and what they give on validation and test."""

    model_config = _SCHEMA
    confidence: Measure = "max_softmax"
    mode: Literal["accuracy", "budget"] = "accuracy"
    epsilon_pp: float | None = None
    budget: float | None = None
    z: float = 0.0
    thresholds: list[float] = []
    val: PolicyOutcome | None = None
    test: PolicyOutcome | None = None


class Policy(PolicyChoice):
    """The chosen policy plus the ε sweep the export report plots."""

    sweep: list[SweepPoint] = []
    exit_selection: ExitSelection | None = None


class Ensemble(BaseModel):
    model_config = _SCHEMA
    val_accuracy: float
    test_accuracy: float
    flops_fraction: float


class ManifestBody(BaseModel):
    """Everything export decides; `save_artifact` adds the identity and the weights' hash."""

    model_config = _SCHEMA
    created: str | None = None
    architecture: ArchitectureSpec
    classes: list[str] = Field(min_length=1)
    input: InputSpec
    exits: list[ExitInfo] = Field(min_length=1)
    ensemble: Ensemble | None = None
    policy: Policy = Policy()
    latency_device: str | None = None
    dataset: str | None = None
    training: dict[str, Any] = {}
    code_version: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ManifestBody:
        numbers = [e.exit for e in self.exits]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"exits must be numbered 1..{len(numbers)} in order, got {numbers}")
        if len(self.classes) != self.architecture.num_classes:
            raise ValueError(
                f"{len(self.classes)} class names for a network of {self.architecture.num_classes} classes"
            )
        if self.input.channels != self.architecture.in_channels:
            takes = self.architecture.in_channels
            raise ValueError(f"input has {self.input.channels} channels, the network takes {takes}")
        return self

    @property
    def num_exits(self) -> int:
        return len(self.exits)


class Manifest(ManifestBody):
    """The whole `manifest.json` of an artifact."""

    schema_version: Literal[1]
    name: str
    version: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass
class Artifact:
    """A loaded artifact: the network in eval mode, its manifest, and where it came from."""

    model: MultiExitNet
    manifest: Manifest
    path: Path

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_versions(store: Path, name: str) -> list[str]:
    """Versions of `name` in the store, oldest first (numeric versions sort as numbers)."""
    root = Path(store) / name
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))


def resolve_artifact(store: Path, name: str, version: str | None = None) -> Path:
    """The directory of `name`/`version`; the newest version when `version` is None."""
    if version is None:
        versions = list_versions(store, name)
        if not versions:
            raise ArtifactError(f"No artifact named {name!r} in model store {store}")
        version = versions[-1]
    path = Path(store) / name / version
    if not path.is_dir():
        known = ", ".join(list_versions(store, name)) or "none"
        raise ArtifactError(f"No artifact {name}/{version} in model store {store}; versions: {known}")
    return path


def save_artifact(
    model: MultiExitNet,
    body: ManifestBody,
    store: Path,
    name: str,
    version: str | None = None,
    extra_files: Callable[[Path, Manifest], None] | None = None,
) -> Path:
    """Write an artifact atomically and return its directory. An existing version is never overwritten.

    The name, version, schema version and weights hash are added to `body` here.
    `extra_files(tmpdir, manifest)` may add files (the export report) before the rename.
    """
    if version is None:
        numeric = [int(v) for v in list_versions(store, name) if v.isdigit()]
        version = str(max(numeric, default=0) + 1)
    for label, value in (("name", name), ("version", version)):
        if not _NAME_RE.match(value):
            raise ArtifactError(f"Artifact {label} {value!r} must be letters, digits, '.', '_' or '-'")
    if len(body.exits) != model.num_exits:
        raise ArtifactError(f"Manifest lists {len(body.exits)} exits, the network has {model.num_exits}")
    final = Path(store) / name / version
    if final.exists():
        raise ArtifactError(f"Artifact {name}/{version} already exists at {final}; choose another version")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=final.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        manifest = Manifest(
            **body.model_dump(),
            schema_version=SCHEMA_VERSION,
            name=name,
            version=version,
            weights_sha256=sha256_file(tmp / WEIGHTS),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        if extra_files is not None:
            extra_files(tmp, manifest)
        # mkdtemp makes the directory private and safetensors writes 0600: give the artifact the
        # permissions of any file written here (the umask), so a server running as another user
        # can read the store.
        umask = _umask()
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "manifest"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def read_manifest(path: Path) -> Manifest:
    """Parse and validate an artifact's manifest.json; ArtifactError names the first bad field."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path} is not an artifact: no {MANIFEST}")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file} is not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{file} must hold a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{file} has schema version {raw.get('schema_version')!r}; this code reads version {SCHEMA_VERSION}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{file}: invalid manifest: {_first_error(exc)}") from None


def load_artifact(path: Path, device: str | torch.device = "cpu") -> Artifact:
    """Load and verify an artifact directory; the network comes back in eval mode on `device`."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path} has no {WEIGHTS}")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise ArtifactError(
            f"{weights} does not match its manifest: sha256 {actual[:12]}… != {manifest.weights_sha256[:12]}…"
        )
    try:
        model = manifest.architecture.build()
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: weights do not fit the manifest's architecture: {exc}") from exc
    if manifest.num_exits != model.num_exits:
        raise ArtifactError(f"{path}: manifest lists {manifest.num_exits} exits, network has {model.num_exits}")
    return Artifact(model.to(device).eval(), manifest, path)

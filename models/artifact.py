"""The versioned model artifact that training writes and the server reads.

``<store>/<name>/<version>/`` holds ``weights.safetensors`` and ``manifest.json`` (plus the
export report). Loading rebuilds the network from the manifest alone, verifies the weights'
sha256 and never unpickles anything. Saving writes a hidden temporary directory and renames
it into place, so a half-written artifact is never visible.
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
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.multi_exit import MultiExitNet
from models.registry import build_model_from_spec

SCHEMA_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "name", "version", "architecture", "classes", "input", "exits", "weights_sha256")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, tampered with or of an unknown schema."""


@dataclass
class Artifact:
    """A loaded artifact: the network in eval mode, its manifest, and where it came from."""

    model: MultiExitNet
    manifest: dict[str, Any]
    path: Path

    @property
    def num_exits(self) -> int:
        return len(self.manifest["exits"])


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
    manifest: dict[str, Any],
    store: Path,
    name: str,
    version: str | None = None,
    extra_files: Callable[[Path, dict[str, Any]], None] | None = None,
) -> Path:
    """Write an artifact atomically and return its directory. An existing version is never overwritten.

    `manifest` must carry `architecture`, `classes`, `input` and `exits`; the name, version,
    schema version and weights hash are filled in here. `extra_files(tmpdir, manifest)` may add files
    (the export report) before the rename.
    """
    if version is None:
        numeric = [int(v) for v in list_versions(store, name) if v.isdigit()]
        version = str(max(numeric, default=0) + 1)
    for label, value in (("name", name), ("version", version)):
        if not _VERSION_RE.match(value):
            raise ArtifactError(f"Artifact {label} {value!r} must be letters, digits, '.', '_' or '-'")
    final = Path(store) / name / version
    if final.exists():
        raise ArtifactError(f"Artifact {name}/{version} already exists at {final}; choose another version")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=final.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        full = {**manifest, "schema_version": SCHEMA_VERSION, "name": name, "version": version}
        full["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        missing = [k for k in REQUIRED_KEYS if k not in full]
        if missing:
            raise ArtifactError(f"Manifest lacks {', '.join(missing)}")
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
        if extra_files is not None:
            extra_files(tmp, full)
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check an artifact's manifest.json."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path} is not an artifact: no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file} is not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file} must hold a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{file} has schema version {manifest.get('schema_version')!r}; this code reads version {SCHEMA_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{file} lacks {', '.join(missing)}")
    return manifest


def load_artifact(path: Path, device: str | torch.device = "cpu") -> Artifact:
    """Load and verify an artifact directory; the network comes back in eval mode on `device`."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path} has no {WEIGHTS}")
    actual = sha256_file(weights)
    if actual != manifest["weights_sha256"]:
        raise ArtifactError(
            f"{weights} does not match its manifest: sha256 {actual[:12]}… != {str(manifest['weights_sha256'])[:12]}…"
        )
    try:
        model = build_model_from_spec(manifest["architecture"])
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: weights do not fit the manifest's architecture: {exc}") from exc
    if len(manifest["exits"]) != model.num_exits:
        raise ArtifactError(f"{path}: manifest lists {len(manifest['exits'])} exits, network has {model.num_exits}")
    return Artifact(model.to(device).eval(), manifest, path)

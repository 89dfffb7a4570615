"""The artifact format: round trip, integrity checks, no pickle, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from models import build_model
from models.artifact import (
    ArtifactError,
    Manifest,
    ManifestBody,
    list_versions,
    load_artifact,
    read_manifest,
    resolve_artifact,
    save_artifact,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "test_tiny", "num_classes": 3, "in_channels": 1, "stem": "cifar", "kwargs": {}}


def _manifest() -> ManifestBody:
    exits = [{"exit": k + 1, "temperature": 1.0, "threshold": 0.9} for k in range(3)]
    spec = {"size": 16, "channels": 1, "color_mode": "L", "resize": None, "mean": [0.5], "std": [0.25]}
    raw = {"architecture": SPEC, "classes": ["a", "b", "c"], "exits": exits, "input": spec}
    return ManifestBody.model_validate(raw)


def _trained_model() -> torch.nn.Module:
    model = build_model("test_tiny", 3, in_channels=1)
    model.train()
    model(torch.randn(8, 1, 16, 16))  # non-trivial BN statistics
    return model.eval()


def test_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model = _trained_model()
    path = save_artifact(model, _manifest(), tmp_path, "tiny")
    assert path == tmp_path / "tiny" / "1"
    loaded = load_artifact(path)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        for a, b in zip(model(x).logits, loaded.model(x).logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.manifest.name == "tiny" and loaded.manifest.version == "1"
    assert save_artifact(model, _manifest(), tmp_path, "tiny").name == "2"
    assert resolve_artifact(tmp_path, "tiny") == tmp_path / "tiny" / "2"


def test_artifact_is_readable_by_other_users_as_the_umask_allows(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}


def test_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    save_artifact(_trained_model(), _manifest(), tmp_path, "tiny", "1")
    with pytest.raises(ArtifactError, match="already exists"):
        save_artifact(_trained_model(), _manifest(), tmp_path, "tiny", "1")


def test_corrupted_weights_fail_the_hash_check(tmp_path: Path) -> None:
    path = save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest: sha256"):
        load_artifact(path)


def test_truncated_manifest_gives_a_clear_error(tmp_path: Path) -> None:
    path = save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path)


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema version 99"):
        load_artifact(path)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_planted_pickle_is_never_executed(tmp_path: Path) -> None:
    path = save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    marker = tmp_path / "pwned"
    weights = path / "weights.safetensors"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((path / "manifest.json").read_text())
    from models.artifact import sha256_file

    manifest["weights_sha256"] = sha256_file(weights)  # an attacker who also rewrote the hash
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        load_artifact(path)
    assert not marker.exists()


def test_a_failed_save_leaves_nothing_visible(tmp_path: Path) -> None:
    def crash(directory: Path, manifest: Manifest) -> None:
        (directory / "report.md").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_artifact(_trained_model(), _manifest(), tmp_path, "tiny", extra_files=crash)
    assert list((tmp_path / "tiny").iterdir()) == []
    assert list_versions(tmp_path, "tiny") == []


def test_a_leftover_temp_dir_from_a_killed_writer_is_invisible(tmp_path: Path) -> None:
    (tmp_path / "tiny" / ".1.tmp-abc").mkdir(parents=True)
    assert list_versions(tmp_path, "tiny") == []
    with pytest.raises(ArtifactError, match="No artifact named 'tiny'"):
        resolve_artifact(tmp_path, "tiny")


def test_missing_artifact_names_the_versions(tmp_path: Path) -> None:
    save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    with pytest.raises(ArtifactError, match="versions: 1"):
        resolve_artifact(tmp_path, "tiny", "7")


def test_the_bundled_manifest_validates_unchanged() -> None:
    m = read_manifest(ROOT / "model_store" / "fashion-mnist" / "1")
    assert m.name == "fashion-mnist" and m.num_exits == 4 and m.exits[0].latency_ms["1"].stage_ms > 0
    assert m.policy.thresholds[:2] == [0.73, 0.7000000000000001] and m.exits[0].expected_agreement is None


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda m: m["exits"][1].update(threshold="high"), "exits.1.threshold"),
        (lambda m: m["exits"][0].pop("threshold"), "exits.0.threshold"),
        (lambda m: m["input"].update(mean=[0.5, 0.5]), "input"),
        (lambda m: m.update(classes=["a", "b"]), "2 class names for a network of 3 classes"),
        (lambda m: m["exits"].reverse(), "exits must be numbered 1..3"),
        (lambda m: m.update(weights_sha256="abc"), "weights_sha256"),
    ],
)
def test_an_invalid_manifest_is_refused_naming_the_field(tmp_path: Path, edit, field: str) -> None:
    path = save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="invalid manifest") as info:
        load_artifact(path)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_keys_of_a_later_schema_revision_are_ignored(tmp_path: Path) -> None:
    path = save_artifact(_trained_model(), _manifest(), tmp_path, "tiny")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["exits"][0]["future_field"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert load_artifact(path).manifest.exits[0].threshold == 0.9

"""Bring your own pretrained model: torchvision weights in, exits trained on top, photos served."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

from models.artifact import load_artifact
from models.preprocess import Preprocess, to_mode, upright
from models.pretrained import ARCHITECTURES, ImportMismatch, from_torchvision
from tests.helpers import ServerProcess
from training.cli import main as train_cli
from training.export import main as export_cli
from training.importer import main as import_cli
from training.trainer import load_trained


def _torchvision(arch: str, seed: int = 0, num_classes: int = 1000) -> torch.nn.Module:
    """A randomly initialised torchvision model whose batch norms hold non-trivial statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_final_exit_gives_torchvision_s_logits(arch: str, tmp_path: Path) -> None:
    reference = _torchvision(arch)
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    ours = from_torchvision(arch, torch.load(weights, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits[-1], reference(x), rtol=0, atol=1e-5)
    assert ours.num_exits == 4


def test_the_import_cli_writes_a_checkpoint_that_training_takes(tmp_path: Path) -> None:
    reference = _torchvision("resnet18")
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    assert import_cli(["torchvision", "resnet18", "--weights", str(weights), "--out", str(tmp_path / "init.pt")]) == 0
    model, spec = load_trained(str(tmp_path / "init.pt"))
    assert (spec.name, spec.num_classes, spec.stem) == ("resnet18", 1000, "imagenet")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits[-1], reference(x), rtol=0, atol=1e-5)
    from safetensors.torch import save_file

    save_file(reference.state_dict(), str(tmp_path / "resnet18.safetensors"))
    out = tmp_path / "from-safetensors.pt"
    assert import_cli(["torchvision", "resnet18", "--weights", str(tmp_path / "resnet18.safetensors"),
                       "--out", str(out)]) == 0  # fmt: skip


def test_weights_that_do_not_fit_are_refused_naming_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = _torchvision("resnet18").state_dict()
    missing = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    with pytest.raises(ImportMismatch, match=r"missing keys: stages\.0\.1\.0\.conv1\.weight"):
        from_torchvision("resnet18", missing)
    with pytest.raises(ImportMismatch, match="unexpected keys: extra.weight"):
        from_torchvision("resnet18", {**state, "extra.weight": torch.zeros(1)})
    wrong = {**state, "layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)}
    with pytest.raises(ImportMismatch, match=r"shape mismatch: layer2\.0\.conv1\.weight \(128, 64, 5, 5\)"):
        from_torchvision("resnet18", wrong)
    with pytest.raises(ImportMismatch, match="missing keys: stages.0.1.2"):  # ResNet-18 weights as ResNet-34
        from_torchvision("resnet34", state)
    with pytest.raises(ValueError, match="Unknown torchvision architecture 'resnet19'"):
        from_torchvision("resnet19", state)
    torch.save(missing, tmp_path / "bad.pth")
    assert import_cli(["torchvision", "resnet18", "--weights", str(tmp_path / "bad.pth"),
                       "--out", str(tmp_path / "x.pt")]) == 2  # fmt: skip
    assert "missing keys" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def _photo(seed: int, size: tuple[int, int], mode: str = "RGB", rotate_exif: bool = False) -> bytes:
    """A synthetic photo: a gradient background with a shape whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) * rng.uniform(0.3, 1.0, 3)
    im = Image.fromarray(grad.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    colour = tuple(int(c) for c in rng.integers(0, 255, 3))
    box = (w // 4 + int(rng.integers(0, 20)), h // 4, 3 * w // 4, 3 * h // 4 + int(rng.integers(0, 20)))
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    exif = Image.Exif()
    if rotate_exif:
        exif[0x0112] = 6  # rotated 90° clockwise: the server must turn it upright
    im.convert(mode).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.slow
def test_a_pretrained_resnet50_gets_exits_and_serves_photos(tmp_path: Path) -> None:
    """torchvision resnet50 (random weights, fine-tuned to 3 classes as a user's would be) saved →
    imported → ramps trained a few steps on a small ImageFolder → exported → served: a real JPEG photo
    is classified, and at threshold 1 the served final exit's probabilities are torchvision's logits
    through the exit's calibrated softmax."""
    reference = _torchvision("resnet50", num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    init = tmp_path / "r50" / "init.pt"
    assert import_cli(["torchvision", "resnet50", "--weights", str(tmp_path / "resnet50.pth"), "--out", str(init)]) == 0
    data = tmp_path / "photos"
    for split, count in (("train", 5), ("val", 3)):
        for c, cls in enumerate(("boots", "shirts", "bags")):
            (data / split / cls).mkdir(parents=True)
            for i in range(count):
                mode = "L" if i == 0 else "RGB"  # grayscale photos too
                photo = _photo(100 * c + i, (300 + 10 * i, 240), mode, rotate_exif=i == 1)
                (data / split / cls / f"{i}.jpg").write_bytes(photo)
    run = tmp_path / "r50-ramps"
    assert train_cli(["--method", "ramps", "--init", str(init), "--dataset", "imagefolder", "--data-dir", str(data),
                      "--epochs", "1", "--batch-size", "4", "--max-steps", "2", "--val-size", "4",
                      "--out-dir", str(run), "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    assert export_cli([str(run / "best.pt"), "--store", str(tmp_path / "store"), "--name", "photos",
                       "--latency-batch-sizes", "1", "--latency-repeats", "2"]) == 0  # fmt: skip
    artifact = load_artifact(tmp_path / "store" / "photos" / "1")
    spec = artifact.manifest.input
    assert (spec.size, spec.resize, spec.color_mode, spec.channels) == (224, 256, "RGB", 3)
    server = ServerProcess(tmp_path / "store", "photos", max_batch=4).wait_ready()
    try:
        photo = _photo(7, (640, 480), rotate_exif=True)
        answer = httpx.post(f"{server.url}/classify", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["exits"] == 4, answer.text
        body = {"parameters": {"threshold": 1}, "outputs": [{"name": "probabilities"}, {"name": "exit"}],
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(photo).decode()]}]}  # fmt: skip
        oip = httpx.post(f"{server.url}/v2/models/photos/infer", json=body, timeout=60).json()
    finally:
        assert server.stop() == 0
    outputs = {o["name"]: o["data"] for o in oip["outputs"]}
    assert outputs["exit"] == [4]
    x = Preprocess(spec)(to_mode(upright(Image.open(io.BytesIO(photo))), "RGB")).unsqueeze(0)
    with torch.no_grad():
        expected = torch.softmax(reference(x) / artifact.manifest.exits[-1].temperature, dim=1)[0]
    served = torch.tensor(outputs["probabilities"])
    assert math.isclose(float(served.sum()), 1.0, rel_tol=1e-4)
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)

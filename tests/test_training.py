"""The trainer: optimisation steps, DDP under torchrun, exact resume, real data, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from models import build_model
from tools.processes import ROOT, free_port
from training.cli import main as train_cli
from training.config import TrainConfig, config_from_args
from training.data import DataError, load_data
from training.trainer import Trainer, train_step


@pytest.mark.parametrize("method", ["byot", "dsn", "standard", "kd"])
def test_one_step_lowers_the_loss(method: str) -> None:
    model = build_model("test_tiny", 4)
    teacher = build_model("test_tiny", 4).eval() if method == "kd" else None
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = TrainConfig(method=method, teacher="unused" if teacher else None)
    model.eval()  # fixed BN statistics: the same function before and after the step
    before, _ = train_step(model, x, y, optimizer, None, cfg, None, teacher)
    after, _ = train_step(model, x, y, optimizer, None, cfg, None, teacher)
    assert after["loss"] < before["loss"]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", *args]
    # gloo on the loopback interface only: no test traffic leaves the machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    # Own process group: on a timeout the workers go too, not only torchrun.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_one_process(tmp_path: Path) -> None:
    proc = _torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1, one = (
        torch.load(tmp_path / f, weights_only=True) for f in ("world2-rank0.pt", "world2-rank1.pt", "world1-rank0.pt")
    )
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
        torch.testing.assert_close(r0[key], one[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(one[k], build_model("test_tiny", 4).state_dict()[k]) for k in one)


@pytest.mark.slow
def test_trainer_cli_runs_under_torchrun(tmp_path: Path) -> None:
    proc = _torchrun(
        "-m",
        "training.cli",
        "--model",
        "test_tiny",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out-dir",
        str(tmp_path),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "results.md").is_file()


def _cfg(out: Path, **kw: object) -> TrainConfig:
    base = {"model": "test_tiny", "dataset": "synthetic", "epochs": 2, "batch_size": 16, "out_dir": str(out)}
    return TrainConfig(**{"progress": False, "schedule": "multistep", "milestones": [0.5], **base, **kw})


def test_resume_continues_exactly(tmp_path: Path) -> None:
    Trainer(_cfg(tmp_path / "straight")).fit()
    Trainer(_cfg(tmp_path / "split", stop_after=1)).fit()
    assert not (tmp_path / "split" / "results.md").exists()
    Trainer(_cfg(tmp_path / "split", resume=True)).fit()
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for part in ("model", "adapters"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=0)
    assert set(a["adapters"]) == {"0.weight", "0.bias"}  # reference hint: exit 1 of 3 has an adapter
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_ramps_train_only_the_shallow_heads(tmp_path: Path) -> None:
    from models.artifact import load_artifact
    from training.export import main as export_cli

    Trainer(_cfg(tmp_path / "standard", method="standard", epochs=1)).fit()
    init = torch.load(tmp_path / "standard" / "best.pt", weights_only=True)["model"]
    Trainer(_cfg(tmp_path / "ramps", method="ramps", init=str(tmp_path / "standard" / "best.pt"))).fit()
    after = torch.load(tmp_path / "ramps" / "last.pt", weights_only=True)["model"]
    frozen = [k for k in init if k.startswith(("stages.", "exits.2."))]
    trained = [k for k in init if k.startswith(("exits.0.", "exits.1.")) and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(init[k], after[k]) for k in frozen)  # weights and batch-norm statistics alike
    assert all(not torch.equal(init[k], after[k]) for k in trained)
    assert export_cli([str(tmp_path / "ramps" / "best.pt"), "--store", str(tmp_path / "store"), "--name", "r"]) == 0
    exported = load_artifact(tmp_path / "store" / "r" / "1").model.state_dict()
    assert set(exported) == set(init)  # adapters are training-only: never in the artifact


def test_init_refuses_another_architecture(tmp_path: Path) -> None:
    Trainer(_cfg(tmp_path / "standard", method="standard", epochs=1, max_steps=1)).fit()
    with pytest.raises(ValueError, match="--model resnet18 but the --init network is test_tiny"):
        Trainer(_cfg(tmp_path / "x", model="resnet18", init=str(tmp_path / "standard" / "best.pt")))
    with pytest.raises(ValueError, match="needs --init"):
        _cfg(tmp_path / "y", method="ramps")


def test_kd_warmup_ramps_alpha(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, kd_warmup_epochs=4, alpha=0.4))
    assert [round(trainer._alpha(e), 3) for e in range(5)] == [0.1, 0.2, 0.3, 0.4, 0.4]


def test_augmentation_recipes() -> None:
    from torchvision.transforms import v2

    from training.data import _tensor_transforms

    def kinds(augment: str) -> list[type]:
        return [type(t) for t in _tensor_transforms(True, 28, [0.5], [0.5], augment).transforms]

    assert v2.RandomCrop not in kinds("none") and v2.RandomErasing not in kinds("standard")
    assert {v2.RandomCrop, v2.RandomHorizontalFlip, v2.RandomErasing} <= set(kinds("erasing"))
    assert v2.RandomCrop not in [type(t) for t in _tensor_transforms(False, 28, [0.5], [0.5], "erasing").transforms]


def test_fashion_mnist_loader_reads_the_real_files() -> None:
    bundle = load_data("fashion-mnist", val_size=5000, allow_download=False)
    assert len(bundle.train) + len(bundle.val) == 60_000 and len(bundle.val) == 5000
    assert len(bundle.test) == 10_000
    train_labels = bundle.train.dataset.labels
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10
    x, _ = bundle.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert bundle.classes[0] == "T-shirt/top" and bundle.num_classes == 10


def test_missing_data_names_every_way_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("training.data.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.delenv("ANYTIME_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="--data-dir.*ANYTIME_DATA_DIR.*apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist", data_dir=str(tmp_path), allow_download=False)


def test_cli_end_to_end_writes_checkpoint_log_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = train_cli(
        [
            "--model",
            "test_tiny",
            "--dataset",
            "synthetic",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--max-steps",
            "3",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "| test |" in capsys.readouterr().out
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "results.md", "results.json"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "val_acc_exit3" in records[0]
    # Where the run came from: the code version and the libraries, in config.yaml (as comments, so that it
    # still reads back with --config) and in every checkpoint.
    config = (tmp_path / "config.yaml").read_text()
    assert config.startswith("# code_version: ") and f"# torch: {torch.__version__}" in config
    assert config_from_args(["--config", str(tmp_path / "config.yaml")]).model == "test_tiny"
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    assert state["provenance"]["code_version"] == config.split("\n")[0].removeprefix("# code_version: ")


def test_cli_rejects_bad_settings_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli(["--method", "magic", "--dataset", "synthetic"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


@pytest.mark.cuda
def test_amp_channels_last_training_on_cuda(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, device="cuda", amp="bf16", channels_last=True, epochs=1)
    rows = Trainer(cfg).fit()
    assert rows["test"]["exit3"] > 0


def test_export_s_ensemble_is_that_of_the_exits_it_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ensemble's accuracy and its FLOPs over the same exits (the accuracy was over every exit trained)."""
    from models.artifact import load_artifact
    from training import export as export_module
    from training.evaluate import accuracies, collect_logits
    from training.exit_selection import Selection, select_exits

    Trainer(_cfg(tmp_path / "run", epochs=2)).fit()

    def without_exit_2(*args: object, **kwargs: object) -> Selection:
        chosen = select_exits(*args, **kwargs)
        return Selection([0, 2], chosen.result, chosen.steps)

    monkeypatch.setattr(export_module, "select_exits", without_exit_2, raising=False)
    assert export_module.main([str(tmp_path / "run" / "best.pt"), "--store", str(tmp_path / "s"), "--name", "e",
                               "--latency-batch-sizes", "1", "--latency-repeats", "1"]) == 0  # fmt: skip
    artifact = load_artifact(tmp_path / "s" / "e" / "1")
    assert artifact.model.num_exits == 2
    bundle = load_data("synthetic")
    logits, y = collect_logits(
        artifact.model, torch.utils.data.DataLoader(bundle.val, batch_size=64), torch.device("cpu")
    )
    assert artifact.manifest.ensemble.val_accuracy == pytest.approx(accuracies(logits, y)["ensemble"])


def test_export_cli_writes_a_loadable_artifact_with_report(tmp_path: Path) -> None:
    from models.artifact import load_artifact
    from training.export import main as export_cli

    run = tmp_path / "run"
    assert (
        train_cli(
            [
                "--model",
                "test_tiny",
                "--dataset",
                "synthetic",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--out-dir",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert export_cli([str(run / "best.pt"), "--store", str(tmp_path / "store"), "--name", "tiny"]) == 0
    artifact = load_artifact(tmp_path / "store" / "tiny" / "1")
    m = artifact.manifest
    assert len(m.exits) == 3 and m.exits[-1].threshold == 0.0
    assert set(m.exits[0].latency_ms) == {"1", "8", "32"}
    assert m.exits[-1].expected_agreement is None  # the final exit agrees with itself: no expectation
    assert all(e.expected_agreement is None or 0 <= e.expected_agreement <= 1 for e in m.exits)
    assert m.policy.val.accuracy >= m.exits[-1].val_accuracy - 0.5 - 1e-9
    assert m.weights_sha256 and m.code_version and m.training["model"] == "test_tiny"
    assert (artifact.path / "report.md").read_text().startswith("# tiny v1")
    assert (artifact.path / "exit_profile.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        export_cli([str(run / "best.pt"), "--store", str(tmp_path / "store"), "--name", "tiny", "--version", "1"]) == 2
    )


def test_the_tensor_path_augments_like_the_dataloader_path() -> None:
    """Crop (pad 2 + random translation) and flip as batched tensor ops: the same statistics as torchvision's
    per-image transforms, over 20,000 draws of one image."""
    from training.data import _tensor_transforms, load_data
    from training.device_data import device_data

    bundle = load_data("fashion-mnist", allow_download=False)
    data = device_data(bundle.train, torch.device("cpu"), bundle.mean, bundle.std, "standard")
    image = data.images[:1]
    tensor_path = data.augment(image.repeat(20_000, 1, 1, 1), torch.Generator().manual_seed(0))
    transform = _tensor_transforms(True, 28, bundle.mean, bundle.std, "standard")
    loader_path = torch.stack([transform(image[0]) for _ in range(20_000)])
    assert abs(tensor_path.mean() - loader_path.mean()) < 0.005 and abs(tensor_path.std() - loader_path.std()) < 0.005
    assert (tensor_path.mean(0) - loader_path.mean(0)).abs().max() < 0.08  # per pixel: shifts and flips alike
    plain = data.normalise(image.float() / 255)
    unchanged = (tensor_path == plain).flatten(1).all(1).float().mean()
    assert 0.02 < unchanged < 0.06  # no shift and no flip: 1/25 × 1/2 (a symmetric image would differ)
    erased = device_data(bundle.train, torch.device("cpu"), bundle.mean, bundle.std, "erasing")
    out = erased.augment(image.repeat(4000, 1, 1, 1), torch.Generator().manual_seed(1))
    zeros = (out == 0).flatten(1).float().mean(1)
    assert 0.4 < (zeros > 0.015).float().mean() < 0.6  # half the images get a rectangle


def test_the_tensor_path_is_reproducible_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = {"data_path": "tensor", "augment": "standard"}
    Trainer(_cfg(tmp_path / "a", **cfg)).fit()
    Trainer(_cfg(tmp_path / "b", **cfg)).fit()
    Trainer(_cfg(tmp_path / "c", stop_after=1, **cfg)).fit()
    Trainer(_cfg(tmp_path / "c", resume=True, **cfg)).fit()
    states = [torch.load(tmp_path / run / "last.pt", weights_only=True)["model"] for run in "abc"]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
        torch.testing.assert_close(states[0][key], states[2][key], rtol=0, atol=0)
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["images_per_s"] > 0 for r in log)


def test_larger_batches_scale_the_learning_rate_and_warm_up() -> None:
    """Linear scaling from batch 128 and, above it, a warm-up of min(5, epochs / 10) epochs."""
    trainer = Trainer(_cfg(Path("unused"), batch_size=512, epochs=20, schedule="cosine"))
    assert trainer.base_lr() == pytest.approx(0.4) and trainer.warmup_epochs() == 2
    lrs = []
    for _ in range(4):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        trainer.scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(0.4) and lrs[3] < lrs[2]
    default = Trainer(_cfg(Path("unused"), batch_size=16))
    assert default.base_lr() == pytest.approx(0.1 * 16 / 128) and default.warmup_epochs() == 0


def test_schedules_count_optimiser_steps_not_epochs(tmp_path: Path) -> None:
    """Two epochs of 8 steps: cosine takes 16 values (a per-epoch schedule was a 2-step staircase), and a
    resumed run carries on from the same step."""
    trainer = Trainer(_cfg(tmp_path / "c", schedule="cosine", warmup_epochs=1))
    assert trainer.steps_per_epoch() == 8
    lrs = []
    for _ in range(16):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert len(set(lrs)) == 16 and lrs[:9] == sorted(lrs[:9]) and lrs[8:] == sorted(lrs[8:], reverse=True)
    Trainer(_cfg(tmp_path / "r", schedule="cosine", stop_after=1)).fit()
    resumed = Trainer(_cfg(tmp_path / "r", schedule="cosine", resume=True))
    fresh = Trainer(_cfg(tmp_path / "f", schedule="cosine"))
    for _ in range(8):
        fresh.optimizer.step()
        fresh.scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])


def test_the_study_trains_runs_in_parallel_processes(tmp_path: Path) -> None:
    from training.reproduce import main as reproduce

    argv = [
        "--model",
        "test_tiny",
        "--methods",
        "standard",
        "dsn",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--parallel",
        "2",
        "--data-path",
        "tensor",
        "--out-dir",
        str(tmp_path / "runs"),
        "--report",
        str(tmp_path / "study.md"),
        "--no-progress",
    ]
    assert reproduce(argv) == 0
    assert all((tmp_path / "runs" / f"{m}-seed0" / "results.json").is_file() for m in ("standard", "dsn"))
    assert "| dsn |" in (tmp_path / "study.md").read_text()


def test_the_study_report_pairs_methods_by_seed() -> None:
    """The study's claims rest on per-seed differences (the same split and initial weights), with their range."""
    from training.reproduce import _paired_table

    def run(e1: float, e2: float) -> dict[str, Any]:
        return {"results": {"test": {"exit1": e1, "exit2": e2}}}

    runs = {"dsn": [run(89.0, 91.0), run(90.0, 91.5)], "ramps": [run(85.0, 91.0), run(84.0, 91.7)]}
    lines = _paired_table(runs, [0, 1])
    assert lines[-1] == "| ramps − dsn | -5.00 (-6.00 to -4.00) | +0.10 (+0.00 to +0.20) |"
    assert _paired_table(runs, [0]) == []  # one seed: nothing to pair


def test_ramps_keeps_the_epoch_whose_shallow_exits_are_best(tmp_path: Path) -> None:
    """`ramps` freezes the backbone and the final exit, so the final exit's validation accuracy never moves:
    best.pt is chosen by the mean of the shallow exits it trains (it held epoch 1 however long the run)."""
    Trainer(_cfg(tmp_path / "standard", method="standard", epochs=2)).fit()
    init = str(tmp_path / "standard" / "best.pt")
    Trainer(_cfg(tmp_path / "ramps", method="ramps", init=init, epochs=4, lr=0.05)).fit()
    epochs = [json.loads(line) for line in (tmp_path / "ramps" / "metrics.jsonl").read_text().splitlines()]
    shallow = [(e["val_acc_exit1"] + e["val_acc_exit2"]) / 2 for e in epochs]
    assert len({e["val_acc_exit3"] for e in epochs}) == 1  # the frozen final exit
    best = torch.load(tmp_path / "ramps" / "best.pt", weights_only=True)
    assert best["epoch"] == max(range(len(shallow)), key=lambda i: (shallow[i], -i))
    assert best["best_val"] == pytest.approx(max(shallow))


def test_a_mistyped_data_dir_is_an_error_not_another_copy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no Fashion-MNIST IDX files there"):
        load_data("fashion-mnist", data_dir=str(tmp_path / "typo"), allow_download=False)


def _folder(root: Path, layout: dict[str, list[str]], bad: str | None = None) -> Path:
    for split, classes in layout.items():
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (60 * c, 10 * i, 90)).save(root / split / cls / f"{i}.png")
    if bad:
        (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_image_folder_splits_share_train_s_class_mapping(tmp_path: Path) -> None:
    """val/ without class b: its c is still class 2, as in train/ (each split built its own mapping, so c was 1)."""
    data = _folder(tmp_path / "d", {"train": ["a", "b", "c"], "val": ["a", "c"]})
    bundle = load_data("imagefolder", data_dir=str(data), val_size=2)
    assert bundle.classes == ["a", "b", "c"]
    labels = {Path(p).parent.name: y for p, y in bundle.test.samples}
    assert labels == {"a": 0, "c": 2}
    extra = _folder(tmp_path / "e", {"train": ["a", "b"], "val": ["a", "z"]})
    with pytest.raises(DataError, match="classes that train/ lacks: z"):
        load_data("imagefolder", data_dir=str(extra), val_size=2)


def test_a_corrupt_image_is_an_error_naming_its_file(tmp_path: Path) -> None:
    data = _folder(tmp_path / "d", {"train": ["a", "b"], "val": ["a", "b"]}, bad="val/b/9.png")
    bundle = load_data("imagefolder", data_dir=str(data), val_size=2)
    index = [i for i, (p, _) in enumerate(bundle.test.samples) if p.endswith("9.png")][0]
    with pytest.raises(DataError, match=r"9\.png is not a readable image"):
        bundle.test[index]


def test_an_image_folder_of_ones_own_at_64_px_with_a_missing_class_and_a_corrupt_file(tmp_path: Path) -> None:
    """What a user's folder looks like: val/ lacks a class, one file is broken, photos are not 224 px."""
    from models.artifact import load_artifact
    from training.export import main as export_cli

    data = _folder(tmp_path / "d", {"train": ["a", "b", "c"], "val": ["a", "c"]}, bad="train/b/9.png")
    run = tmp_path / "run"
    argv = ["--model", "test_tiny", "--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "64",
            "--augment", "erasing", "--normalization", "computed", "--skip-bad-images", "--val-size", "3",
            "--epochs", "1", "--batch-size", "4", "--out-dir", str(run), "--no-progress", "--threads", "1"]  # fmt: skip
    assert train_cli(argv) == 0
    assert (run / "bad_images.txt").read_text() == f"{data / 'train' / 'b' / '9.png'}\n"
    state = torch.load(run / "best.pt", weights_only=False)
    spec = state["data_spec"]
    assert spec["size"] == 64 and spec["resize"] == 73 and spec["mean"] != [0.485, 0.456, 0.406]
    assert state["model_spec"]["stem"] == "cifar"  # 64 px: the stem that keeps the resolution
    assert export_cli([str(run / "best.pt"), "--store", str(tmp_path / "store"), "--name", "mine"]) == 0
    manifest = load_artifact(tmp_path / "store" / "mine" / "1").manifest
    assert (manifest.input.size, manifest.input.mean) == (64, spec["mean"]) and manifest.classes == ["a", "b", "c"]
    # without --skip-bad-images the broken file stops the run with its name
    strict = [a for a in argv if a != "--skip-bad-images"]
    strict[strict.index("--out-dir") + 1] = str(tmp_path / "strict")
    with pytest.raises(DataError, match=r"9\.png is not a readable image"):
        Trainer(config_from_args(strict)).fit()


def test_the_stem_follows_the_input_size_unless_given() -> None:
    from training.trainer import default_stem, model_spec

    bundle = load_data("synthetic")
    assert default_stem(224) == "imagenet" and default_stem(64) == default_stem(28) == "cifar"
    assert model_spec(TrainConfig(model="test_tiny"), bundle).stem == "cifar"
    assert model_spec(TrainConfig(model="test_tiny", stem="imagenet"), bundle).stem == "imagenet"
    with pytest.raises(ValueError, match="--mean and --std go together"):
        TrainConfig(mean=[0.5, 0.5, 0.5])


def test_a_run_logs_each_exit_s_loss_for_tensorboard_and_draws_its_curves(tmp_path: Path) -> None:
    Trainer(_cfg(tmp_path / "run", tensorboard=True, epochs=2)).fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    exits = [k for k in log[0] if k.startswith("loss_exit")]
    assert exits == ["loss_exit1", "loss_exit2", "loss_exit3"]
    assert sum(log[0][k] for k in exits) == pytest.approx(log[0]["loss"], rel=1e-6)  # the shares add up
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"loss/exit1", "val_acc/exit3", "train_acc/exit2", "train/lr"} <= set(tags)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("# code_version: ")  # the commit


def _coloured(path: Path, c: int, i: int) -> None:
    g = torch.Generator().manual_seed(1000 * c + i)
    base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]][c], dtype=torch.float32).view(3, 1, 1)
    pixels = (base + torch.randn(3, 32, 32, generator=g) * 40).clamp(0, 255).to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)


def test_exit_heads_learn_from_unlabelled_images_and_export_picks_thresholds_by_agreement(tmp_path: Path) -> None:
    """A model whose final exit alone was trained (labels), then ramps on unlabelled images: its shallow
    exits come to agree with the final exit on held-out images, and export chooses thresholds for that."""
    from models.artifact import load_artifact
    from training.evaluate import collect_logits
    from training.export import main as export_cli

    for split, n in (("train", 40), ("val", 10)):
        for c, cls in enumerate(("red", "green", "blue")):
            for i in range(n):
                _coloured(tmp_path / "labelled" / split / cls / f"{i}.png", c, i + (500 if split == "val" else 0))
    for i in range(150):
        _coloured(tmp_path / "traffic" / f"day{i % 3}" / f"{i}.png", i % 3, 2000 + i)
    common = ["--model", "test_tiny", "--image-size", "32", "--batch-size", "16", "--lr", "0.1", "--lr-scaling", "none",
              "--schedule", "cosine", "--no-progress", "--threads", "1"]  # fmt: skip
    assert train_cli([*common, "--method", "standard", "--dataset", "imagefolder", "--data-dir",
                      str(tmp_path / "labelled"), "--val-size", "12", "--epochs", "8",
                      "--out-dir", str(tmp_path / "standard")]) == 0  # fmt: skip
    assert train_cli([*common, "--method", "ramps", "--init", str(tmp_path / "standard" / "best.pt"),
                      "--unlabelled", str(tmp_path / "traffic"), "--val-size", "25", "--epochs", "8",
                      "--out-dir", str(tmp_path / "ramps")]) == 0  # fmt: skip
    cfg = config_from_args(["--method", "ramps", "--init", str(tmp_path / "standard" / "best.pt"), "--unlabelled",
                            str(tmp_path / "traffic"), "--val-size", "25", *common[:4]])  # fmt: skip
    held_out = Trainer(cfg).bundle.test  # images neither run trained on

    def agreement(checkpoint: Path) -> float:
        from training.trainer import load_trained

        model = load_trained(str(checkpoint))[0]
        logits, _ = collect_logits(model, torch.utils.data.DataLoader(held_out, batch_size=64), torch.device("cpu"))
        final = logits[-1].argmax(1)
        return min(float((z.argmax(1) == final).float().mean()) for z in logits[:-1])

    before, after = agreement(tmp_path / "standard" / "best.pt"), agreement(tmp_path / "ramps" / "best.pt")
    print(f"shallow exits' agreement with the final exit on held-out images: {before:.0%} untrained, {after:.0%} after")
    assert after >= 0.9 and after - before >= 0.3, (before, after)
    log = [json.loads(line) for line in (tmp_path / "ramps" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["val_acc_exit3"] == 100.0  # scored against its own predictions: the final exit agrees with itself
    assert export_cli([str(tmp_path / "ramps" / "best.pt"), "--store", str(tmp_path / "store"), "--name", "seen"]) == 0
    manifest = load_artifact(tmp_path / "store" / "seen" / "1").manifest
    assert manifest.dataset == "unlabelled" and manifest.classes == ["blue", "green", "red"]
    assert manifest.exits[-1].val_accuracy == 100.0 and manifest.exits[0].threshold < 1.0  # exit 1 answers early
    val = manifest.policy.val
    print(f"exported: thresholds {[e.threshold for e in manifest.exits]}, val agreement {val.accuracy} %,")
    print(f"exit rates {val.exit_rates}, FLOPs {val.mean_flops_fraction:.2f} of the full network")


def _tiny_cifar100(root: Path, train: int = 180, test: int = 20) -> Path:
    """A CIFAR-100 python-version directory in the standard format, with a few images of each split."""
    import pickle

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", train), ("test", test)):
        labels = torch.randint(0, 100, (n,), generator=g)
        data = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8)
        batch = {b"data": data.numpy(), b"fine_labels": labels.tolist(), b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    return root


@pytest.mark.slow
def test_make_reproduce_cifar100_smoke_runs_on_a_tiny_directory(tmp_path: Path) -> None:
    """The paper's setting as a user starts it, for one step of one epoch: every method trains, and the
    report sets the paper's Table 1 beside ours."""
    data = _tiny_cifar100(tmp_path / "cifar")
    report = tmp_path / "cifar100.md"
    extra = f"--max-steps 1 --val-size 20 --threads 2 --out-dir {tmp_path / 'runs'} --report {report}"
    make = ["make", "--no-print-directory", "reproduce-cifar100", f"CIFAR100_DIR={data}", "CIFAR100_EPOCHS=1",
            "CIFAR100_SEEDS=0", f"CIFAR100_ARGS={extra}"]  # fmt: skip
    done = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    text = report.read_text()
    assert text.startswith("# CIFAR-100: standard, dsn, byot") and "lr × 0.1 at 0.375, 0.65, 0.9 of the run" in text
    assert "| paper: BYOT | 67.85 | 74.57 | 78.23 | 78.64 | 79.67 |" in text and "| ours: byot |" in text
    missing = subprocess.run(["make", "--no-print-directory", "reproduce-cifar100"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "needs CIFAR100_DIR=" in missing.stdout

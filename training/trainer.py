"""The training loop: BYOT and baselines on CPU, one GPU, or many under `torchrun` (DDP)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from models.artifact import ArchitectureSpec, load_artifact
from models.multi_exit import MultiExitNet
from models.seed import seed_everything
from training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import TrainConfig
from training.data import DataBundle, FolderOptions, load_data, targets_of
from training.device_data import DeviceData, device_data
from training.evaluate import accuracies, autocast_for, collect_logits, format_accuracy_table
from training.losses import accuracy_counts, compute_loss, hinted_exits
from training.provenance import provenance
from training.report import plot_curves
from training.wrapper import TrainNet

log = logging.getLogger("anytime.train")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a DDP job (world size 1 without `torchrun`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Join the process group `torchrun` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def leave_distributed() -> None:
    """Leave the process group, if this process joined one, while the interpreter is still whole: a
    finished run that exits with gloo's threads alive can abort in finalization (SIGABRT, "terminate
    called without an active exception"; pytorch/pytorch#190489), and torchrun reports it failed."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(cfg: TrainConfig, ctx: DistContext) -> torch.device:
    """The configured device; `auto` picks CUDA when present. DDP ranks take their local GPU."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA GPU is available")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def resolve_amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA; none on the CPU."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def _tensorboard_tag(key: str) -> str:
    """metrics.jsonl's key as a TensorBoard tag grouped by what it is: `val_acc_exit2` → `val_acc/exit2`."""
    for prefix in ("val_acc_", "train_acc_", "loss_"):
        if key.startswith(prefix):
            return f"{prefix.rstrip('_')}/{key.removeprefix(prefix)}"
    return f"train/{key}"


def default_stem(image_size: int) -> str:
    """The ImageNet stem (stride 4) for inputs larger than 64 px; the CIFAR stem keeps full resolution,
    which at 224 px costs 16 times the FLOPs."""
    return "imagenet" if image_size > 64 else "cifar"


def model_spec(cfg: TrainConfig, bundle: DataBundle) -> ArchitectureSpec:
    """The constructor arguments that rebuild the network (kept in checkpoints and artifacts)."""
    return ArchitectureSpec(
        name=cfg.model,
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        stem=cfg.stem or default_stem(bundle.image_size),
        kwargs={
            "exit_style": cfg.exit_style,
            "attention": cfg.attention,
            **({"exits": list(cfg.exits)} if cfg.exits else {}),
        },
    )


def data_spec(bundle: DataBundle) -> dict[str, Any]:
    """How inputs must look: what the server needs to preprocess an image."""
    return {
        "dataset": bundle.name,
        "classes": bundle.classes,
        "channels": bundle.in_channels,
        "size": bundle.image_size,
        "resize": bundle.resize,
        "mean": bundle.mean,
        "std": bundle.std,
        "color_mode": "L" if bundle.in_channels == 1 else "RGB",
    }


def unlabelled_reading(cfg: TrainConfig) -> tuple[list[str], FolderOptions]:
    """The classes of the --init model and how to read unlabelled images for it: as the model was trained
    (an artifact's input spec, a checkpoint's data spec) unless flags say otherwise; a torchvision import
    knows neither, so ImageNet's reading and class0, class1, …"""
    assert cfg.init is not None
    p = Path(cfg.init)
    if p.is_dir():
        manifest = load_artifact(p).manifest
        known: dict[str, Any] | None = {"classes": manifest.classes, **manifest.input.model_dump()}
    else:
        state = load_checkpoint(p)
        known = state.get("data_spec")
        num_classes = ArchitectureSpec.model_validate(state["model_spec"]).num_classes
    classes = list(cfg.classes or (known["classes"] if known else [f"class{i}" for i in range(num_classes)]))
    options = cfg.folder_options()
    if known is not None:
        given = cfg.model_fields_set
        options = dataclasses.replace(
            options,
            size=cfg.image_size if "image_size" in given else int(known["size"]),
            mean=cfg.mean if "mean" in given else list(known["mean"]),
            std=cfg.std if "std" in given else list(known["std"]),
            channels=int(known["channels"]),
        )
    return classes, options


def load_trained(path: str) -> tuple[MultiExitNet, ArchitectureSpec]:
    """A trained network and its spec, from a trainer checkpoint (.pt) or an exported artifact directory."""
    p = Path(path)
    if p.is_dir():
        artifact = load_artifact(p)
        return artifact.model, artifact.manifest.architecture
    state = load_checkpoint(p)
    spec = ArchitectureSpec.model_validate(state["model_spec"])
    model = spec.build()
    model.load_state_dict(state["model"])
    return model, spec


def loss_options(cfg: TrainConfig, alpha: float) -> dict[str, Any]:
    """The keyword arguments of `compute_loss` for the configured method."""
    opts: dict[str, Any] = {"alpha": alpha, "temperature": cfg.temperature, "kd_scale": cfg.effective_kd_scale}
    if cfg.method in ("byot", "ramps"):
        opts |= {
            "feature_weight": cfg.feature_weight,
            "use_kd": cfg.use_kd,
            "hint": cfg.hint,
            "hint_exits": cfg.hint_exits,
        }
    return opts


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    teacher: MultiExitNet | None = None,
    alpha: float | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """One optimisation step; returns the loss terms and per-exit correct counts, as tensors on the device
    (reading them would make the host wait for the device at every step).

    `alpha` overrides the config's KD weight (the KD warm-up).
    """
    with autocast_for(x.device, amp_dtype):
        out = model(x)
        if cfg.dataset == "unlabelled":  # no labels: the final exit's own predictions are the targets
            y = out.logits[-1].detach().argmax(1)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x).logits[-1]
        opts = loss_options(cfg, cfg.alpha if alpha is None else alpha)
        logits = [z.float() for z in out.logits]
        features = [f.float() for f in out.features]
        terms = compute_loss(cfg.method, logits, features, y, teacher_logits, **opts)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        terms["loss"].backward()
        optimizer.step()
    return {k: v.detach() for k, v in terms.items()}, accuracy_counts(logits, y)


class Trainer:
    """One training run: build everything from the config, then `fit()`."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.ctx = init_distributed()
        self.device = resolve_device(cfg, self.ctx)
        self.amp_dtype = resolve_amp(cfg, self.device)
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        seed_everything(cfg.seed)  # identical initial weights on every rank
        folder, classes = cfg.folder_options(), None
        if cfg.dataset == "unlabelled" and cfg.init:
            classes, folder = unlabelled_reading(cfg)
        self.bundle = load_data(
            cfg.dataset, cfg.data_dir, cfg.val_size, cfg.split_seed, cfg.augment, cfg.allow_download, folder, classes
        )
        self.device_data = self._device_data()
        self._eval_data: dict[str, DeviceData] = {}
        self.model, self.spec = self._network()
        self.model = self.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_net = self._train_net()
        self.optimizer = torch.optim.SGD(
            self.train_net.trainable_parameters(),
            lr=self.base_lr(),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.scheduler = self._make_scheduler()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.teacher = None
        if cfg.method == "kd":
            if not cfg.teacher:
                raise ValueError("method 'kd' needs --teacher (a checkpoint .pt or an artifact directory)")
            self.teacher = load_trained(cfg.teacher)[0].to(self.device).eval()
        self.out = Path(cfg.out_dir)
        self.start_epoch = 0
        self.best_val = -1.0
        self.provenance = provenance()  # the code and library versions, in config.yaml and every checkpoint
        self._writer: Any = None  # TensorBoard's SummaryWriter, made at the first epoch (--tensorboard)
        if cfg.resume:
            self._restore(load_checkpoint(self.out / "last.pt"))
        self.net: nn.Module = self.train_net
        if self.ctx.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            unused = cfg.method in ("standard", "kd")  # shallow exits get no gradient there
            self.net = DistributedDataParallel(self.train_net, device_ids=ids, find_unused_parameters=unused)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def _network(self) -> tuple[MultiExitNet, ArchitectureSpec]:
        """A fresh network for the data, or the `--init` checkpoint's (whose architecture wins)."""
        cfg, bundle = self.cfg, self.bundle
        if not cfg.init:
            spec = model_spec(cfg, bundle)
            return spec.build(), spec
        model, spec = load_trained(cfg.init)
        if "model" in cfg.model_fields_set and cfg.model != spec.name:
            raise ValueError(f"--model {cfg.model} but the --init network is {spec.name}; leave --model out")
        if (spec.num_classes, spec.in_channels) != (bundle.num_classes, bundle.in_channels):
            raise ValueError(
                f"the --init network takes {spec.in_channels} channels and {spec.num_classes} classes; "
                f"{bundle.name} has {bundle.in_channels} and {bundle.num_classes}"
            )
        self.cfg = cfg.model_copy(update={"model": spec.name, "stem": spec.stem})
        log.info("initialised from %s (%s)", cfg.init, spec.name)
        return model, spec

    def _train_net(self) -> TrainNet:
        """The network with its hint adapters (reference hint) and, for ramps, a frozen backbone."""
        cfg = self.cfg
        adapted: list[int] = []
        if cfg.method in ("byot", "ramps") and cfg.hint == "reference":
            adapted = hinted_exits(self.model.num_exits, cfg.hint, cfg.hint_exits)
        shape = (1, self.bundle.in_channels, self.bundle.image_size, self.bundle.image_size)
        with torch.no_grad():
            dim = self.model.eval()(torch.zeros(shape, device=self.device)).features[-1].shape[1]
        frozen = cfg.method == "ramps" and cfg.freeze_backbone
        return TrainNet(self.model, adapted, dim, frozen).to(self.device)

    def _device_data(self) -> DeviceData | None:
        """The tensor data path (training/device_data.py) when the config asks for it, or `auto` on CUDA."""
        cfg, b = self.cfg, self.bundle
        wanted = cfg.data_path == "tensor" or (cfg.data_path == "auto" and self.device.type == "cuda")
        if not wanted or self.ctx.world_size > 1:
            return None
        try:
            return device_data(b.train, self.device, b.mean, b.std, cfg.augment)
        except ValueError as exc:
            if cfg.data_path == "tensor":
                raise
            log.info("DataLoader path: %s", exc)
            return None

    def base_lr(self) -> float:
        """The learning rate after scaling for the batch size (--lr-scaling linear: lr × batch / 128)."""
        cfg = self.cfg
        return cfg.lr * cfg.batch_size / 128 if cfg.lr_scaling == "linear" else cfg.lr

    def warmup_epochs(self) -> int:
        """--warmup-epochs, or by default none at batch 128 or less and min(5, epochs / 10) above."""
        cfg = self.cfg
        if cfg.warmup_epochs is not None:
            return min(cfg.warmup_epochs, cfg.epochs - 1)
        return 0 if cfg.batch_size <= 128 else min(5, max(1, cfg.epochs // 10), cfg.epochs - 1)

    def _alpha(self, epoch: int) -> float:
        """The KD weight of `epoch`: ramped up linearly over `kd_warmup_epochs`."""
        warmup = self.cfg.kd_warmup_epochs
        return self.cfg.alpha * min(1.0, (epoch + 1) / warmup) if warmup else self.cfg.alpha

    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch (the schedules count in steps)."""
        cfg = self.cfg
        if self.device_data is not None:
            steps = self.device_data.size // cfg.batch_size
        else:
            steps = len(self._loader(self.bundle.train, 0))
        return max(1, min(steps, cfg.max_steps) if cfg.max_steps is not None else steps)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning rate by optimiser step: a linear warm-up over the warm-up epochs' steps, then cosine
        over the remaining steps or steps down at the milestones (a fraction of the run, at an epoch's start)."""
        sched = torch.optim.lr_scheduler
        spe = self.steps_per_epoch()
        warm = self.warmup_epochs() * spe
        main: sched.LRScheduler
        if self.cfg.schedule == "cosine":
            main = sched.CosineAnnealingLR(self.optimizer, T_max=self.cfg.epochs * spe - warm)
        else:
            epochs = sorted({max(1, round(f * self.cfg.epochs)) for f in self.cfg.milestones})
            main = sched.MultiStepLR(self.optimizer, [max(1, e * spe - warm) for e in epochs], gamma=self.cfg.gamma)
        if not warm:
            return main
        ramp = sched.LinearLR(self.optimizer, start_factor=1 / (warm + 1), total_iters=warm)
        return sched.SequentialLR(self.optimizer, [ramp, main], milestones=[warm])

    def _loader(self, dataset: Any, epoch: int | None) -> DataLoader:
        cfg, ctx = self.cfg, self.ctx
        if epoch is None:  # evaluation: in order, whole set
            return DataLoader(dataset, batch_size=512, num_workers=cfg.num_workers)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        if ctx.world_size > 1:
            sampler: Any = DistributedSampler(dataset, ctx.world_size, ctx.rank, True, cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=generator)
        return DataLoader(
            dataset,
            batch_size=max(1, cfg.batch_size // ctx.world_size),
            sampler=sampler,
            num_workers=cfg.num_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            generator=generator,
        )

    def _batches(self, epoch: int) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int]:
        """This epoch's training batches and how many there are."""
        cfg = self.cfg
        if self.device_data is not None:
            steps = self.device_data.size // cfg.batch_size
            return self.device_data.batches(cfg.batch_size, cfg.seed, epoch), steps
        loader = self._loader(self.bundle.train, epoch)
        return loader, len(loader)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.net.train()
        batches, steps = self._batches(epoch)
        e = self.model.num_exits
        # the loss terms, each exit's share of the loss, correct counts per exit and ensemble, samples
        sums = torch.zeros(4 + e + e + 1 + 1, dtype=torch.float64, device=self.device)
        names = ("loss", "ce", "kd", "feature")
        start = time.perf_counter()
        show = self.ctx.is_main and (self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty())
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not show)
        for step, (x, y) in enumerate(bar):
            if self.cfg.max_steps is not None and step >= self.cfg.max_steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.to(memory_format=torch.channels_last)
            terms, correct = train_step(
                self.net, x, y, self.optimizer, self.scaler, self.cfg, self.amp_dtype, self.teacher, self._alpha(epoch)
            )
            self.scheduler.step()
            n = len(y)
            sums[:4] += torch.stack([terms[k].double() * n for k in names])
            sums[4 : 4 + e] += terms["per_exit"].double() * n
            sums[4 + e : -1] += correct.double()
            sums[-1] += n
            if show and step % 50 == 0:  # reading a value waits for the device: now and then only
                bar.set_postfix(loss=f"{float(terms['loss']):.3f}", acc=f"{100 * float(correct[-2]) / n:.1f}")
        if self.ctx.world_size > 1:
            dist.all_reduce(sums)  # gloo and nccl both sum float64 on the process's device
        totals = sums.cpu()  # the one read of the epoch
        seconds = time.perf_counter() - start
        count = max(float(totals[-1]), 1.0)
        metrics = {k: float(totals[i]) / count for i, k in enumerate(names)}
        exits = [f"exit{k + 1}" for k in range(self.model.num_exits)] + ["ensemble"]
        metrics |= {f"loss_exit{k + 1}": float(totals[4 + k]) / count for k in range(e)}
        metrics |= {f"train_acc_{n}": 100 * float(totals[4 + e + i]) / count for i, n in enumerate(exits)}
        metrics["images_per_s"] = count / seconds
        return metrics

    def evaluate(self, split: str) -> dict[str, float]:
        """Per-exit and ensemble accuracy (%) on `val` or `test`."""
        dataset = self.bundle.val if split == "val" else self.bundle.test
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = self._loader(dataset, None)
        if self.device_data is not None:  # the split on the device too, once
            if split not in self._eval_data:
                b = self.bundle
                self._eval_data[split] = device_data(dataset, self.device, b.mean, b.std, "none")
            batches = self._eval_data[split].in_order(512)
        logits, targets = collect_logits(self.model, batches, self.device, self.amp_dtype, self.channels_last)
        return accuracies(logits, targets_of(logits, targets))

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "adapters": self.train_net.adapters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "schedule_unit": "step",
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": epoch,
            "best_val": self.best_val,
            "rng": rng_state(),
            "config": self.cfg.model_dump(),
            "model_spec": self.spec.model_dump(),
            "data_spec": data_spec(self.bundle),
            "provenance": self.provenance,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.train_net.adapters.load_state_dict(state.get("adapters") or {})
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("schedule_unit") == "step":
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # a checkpoint from when the schedule stepped per epoch: the same point, counted in steps
            for _ in range((int(state["epoch"]) + 1) * self.steps_per_epoch()):
                self.scheduler.step()
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_val = float(state["best_val"])
        set_rng_state(state["rng"])

    def fit(self) -> dict[str, dict[str, float]]:
        """Train the remaining epochs, checkpoint every epoch, and report the best (by val) model."""
        main = self.ctx.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out / "config.yaml", self.provenance)
            bad = self.bundle.extra.get("bad_images")
            if bad:
                (self.out / "bad_images.txt").write_text("".join(f"{p}\n" for p in bad))
        end = self.cfg.epochs
        if self.cfg.stop_after is not None:
            end = min(end, self.start_epoch + self.cfg.stop_after)
        for epoch in range(self.start_epoch, end):
            lr = self.optimizer.param_groups[0]["lr"]  # at the epoch's first step
            metrics = self._train_epoch(epoch)
            if main:
                val = self.evaluate("val")
                record = {"epoch": epoch + 1, "lr": lr, **metrics, **{f"val_acc_{k}": v for k, v in val.items()}}
                with (self.out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                self._follow(record)
                score = self._selection_score(val)
                if score > self.best_val:
                    self.best_val = score
                    save_checkpoint(self._state(epoch), self.out / "best.pt")
                save_checkpoint(self._state(epoch), self.out / "last.pt")
                log.info(
                    "epoch %d: %.0f images/s, loss %.4f, val %s",
                    epoch + 1,
                    metrics["images_per_s"],
                    metrics["loss"],
                    {k: round(v, 2) for k, v in val.items()},
                )
            if self.ctx.world_size > 1:
                dist.barrier()
        if self._writer is not None:
            self._writer.close()
        return self.report() if main and end == self.cfg.epochs else {}

    def _follow(self, record: dict[str, float]) -> None:
        """An epoch's figures to TensorBoard (with --tensorboard) and the curves plot, redrawn."""
        if self.cfg.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
            for key, value in record.items():
                if key != "epoch":
                    self._writer.add_scalar(_tensorboard_tag(key), value, int(record["epoch"]))
            self._writer.flush()
        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")

    def _selection_score(self, val: dict[str, float]) -> float:
        """What picks `best.pt`: the final exit's validation accuracy, or, for `ramps` (backbone and final
        exit frozen, so the final exit never changes), the mean over the shallow exits it trains."""
        n = self.model.num_exits
        if self.cfg.method == "ramps" and n > 1:
            return sum(val[f"exit{k}"] for k in range(1, n)) / (n - 1)
        return val[f"exit{n}"]

    def report(self) -> dict[str, dict[str, float]]:
        """Evaluate the best checkpoint on val and test; write results.md and results.json."""
        best = self.out / "best.pt"
        if best.is_file():
            self.model.load_state_dict(load_checkpoint(best, self.device)["model"])
        rows = {"val": self.evaluate("val"), "test": self.evaluate("test")}
        table = format_accuracy_table(rows)
        by = "the shallow exits (mean)" if self.cfg.method == "ramps" else "the final exit"
        (self.out / "results.json").write_text(json.dumps(rows, indent=2))
        (self.out / "results.md").write_text(
            f"# {self.cfg.model} / {self.cfg.method} on {self.cfg.dataset}\n\nTop-1 accuracy (%), best epoch by "
            f"validation accuracy of {by}:\n\n{table}\n"
        )
        return rows

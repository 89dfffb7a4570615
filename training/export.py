"""`anytime-export`: checkpoint → calibrated exits, chosen thresholds, latency profile → artifact.

Temperatures and thresholds are fitted on the validation split only; the test split is only
reported (per-exit accuracy and what the chosen policy gives there).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from torch import Tensor
from torch.utils.data import DataLoader

from models.artifact import (
    ArchitectureSpec,
    ArtifactError,
    Ensemble,
    ExitInfo,
    ExitSelection,
    InputSpec,
    ManifestBody,
    Policy,
    PolicyOutcome,
    SelectionStep,
    StageLatency,
    SweepPoint,
    save_artifact,
)
from models.confidence import Measure, confidence
from models.cost import BATCH_SIZES, ExitCost, exit_costs, profile_latency
from models.exit_points import keep_exits
from models.multi_exit import MultiExitNet
from training.calibration import ece_of_logits, fit_temperature
from training.checkpoint import load_checkpoint
from training.config import build_parser, settings_error
from training.data import DataError, FolderOptions, load_data, targets_of
from training.evaluate import accuracies, collect_logits
from training.exit_selection import select_exits
from training.provenance import code_version
from training.report import write_report
from training.thresholds import PolicyResult, agreement_by_exit, evaluate_policy, select_thresholds

log = logging.getLogger("anytime.export")
SWEEP_EPSILONS = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)


class ExportConfig(BaseSettings):
    """Settings of `anytime-export`: flags, or ANYTIME_EXPORT_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="ANYTIME_EXPORT_", extra="forbid")

    checkpoint: Path = Field(description="trainer checkpoint, e.g. runs/x/best.pt")
    name: str = Field(description="artifact name, e.g. fashion-mnist")
    store: Path = Field(Path("model_store"), description="model store directory")
    version: str | None = Field(None, description="artifact version (default: next integer)")
    epsilon: float = Field(0.5, ge=0, le=100, description="max accuracy loss vs the final exit, in pp")
    z: float = Field(1.645, ge=0, description="standard errors added to the accuracy loss (1.645: 95 %% one-sided)")
    mode: Literal["accuracy", "budget"] = Field("accuracy", description="minimise FLOPs within ε, or best accuracy")
    budget: float | None = Field(None, gt=0, le=1, description="budget mode: target mean FLOPs fraction, e.g. 0.5")
    confidence: Measure = Field("max_softmax", description="confidence measure")
    data_dir: str | None = Field(None, description="override the data directory recorded in the checkpoint")
    latency_batch_sizes: list[int] = Field(list(BATCH_SIZES), description="batch sizes of the latency profile")
    latency_repeats: int = Field(40, ge=1, description="timed runs per batch size (after 5 warm-up runs)")
    exits: Literal["select", "all"] = Field(
        "select", description="select: serve only the exits that lower the expected cost (ResNets); all: every exit"
    )

    @model_validator(mode="after")
    def _budget_given(self) -> ExportConfig:
        if self.mode == "budget" and self.budget is None:
            raise ValueError("--mode budget needs --budget")
        return self


def _conf_and_correct(
    logits: list[Tensor], targets: Tensor, temps: list[float], measure: str
) -> tuple[np.ndarray, np.ndarray]:
    conf = torch.stack([confidence(z, t, measure) for z, t in zip(logits, temps, strict=True)]).numpy()
    correct = torch.stack([z.argmax(1) == targets for z in logits]).numpy()
    return conf, correct


def _outcome(r: PolicyResult) -> PolicyOutcome:
    return PolicyOutcome(
        accuracy=r.accuracy * 100,
        mean_flops_fraction=r.mean_flops,
        exit_rates=r.exit_rates,
        loss_bound_pp=r.loss_bound * 100,
    )


@dataclass
class Evaluated:
    """Every exit's logits on the validation and test splits, with the fitted temperatures."""

    val_logits: list[Tensor]
    val_y: Tensor
    test_logits: list[Tensor]
    test_y: Tensor
    temps: list[float]


def _exit_entries(
    ev: Evaluated, costs: list[ExitCost], policy: Policy, latency: list[dict[str, StageLatency]]
) -> list[ExitInfo]:
    val_acc, test_acc = accuracies(ev.val_logits, ev.val_y), accuracies(ev.test_logits, ev.test_y)
    thresholds = policy.thresholds
    conf, _ = _conf_and_correct(ev.val_logits, ev.val_y, ev.temps, policy.confidence)
    predicted = torch.stack([z.argmax(1) for z in ev.val_logits]).numpy()
    expected = agreement_by_exit(conf, predicted, np.array(thresholds))
    return [
        ExitInfo(
            exit=k + 1,
            temperature=ev.temps[k],
            threshold=thresholds[k] if k < len(thresholds) else 0.0,  # the last exit always answers
            params=c.params,
            flops=c.flops,
            flops_fraction=c.flops_fraction,
            served_flops_fraction=c.served_flops_fraction,
            head_flops=c.head_flops,
            latency_ms=latency[k],
            val_accuracy=val_acc[f"exit{k + 1}"],
            test_accuracy=test_acc[f"exit{k + 1}"],
            val_ece_before=ece_of_logits(ev.val_logits[k], ev.val_y),
            val_ece_after=ece_of_logits(ev.val_logits[k], ev.val_y, ev.temps[k]),
            expected_agreement=expected[k],
        )
        for k, c in enumerate(costs)
    ]


def _policy(ev: Evaluated, flops: np.ndarray, cfg: ExportConfig, selection: ExitSelection | None = None) -> Policy:
    """Choose thresholds on val, report them on test, and sweep ε for the report."""
    val_conf, val_correct = _conf_and_correct(ev.val_logits, ev.val_y, ev.temps, cfg.confidence)
    test_conf, test_correct = _conf_and_correct(ev.test_logits, ev.test_y, ev.temps, cfg.confidence)
    chosen = select_thresholds(val_conf, val_correct, flops, cfg.epsilon / 100, cfg.mode, cfg.budget, z=cfg.z)
    on_test = evaluate_policy(test_conf, test_correct, flops, np.array(chosen.thresholds))
    sweep = []
    for eps in SWEEP_EPSILONS:
        r = select_thresholds(val_conf, val_correct, flops, eps, z=cfg.z)
        t = evaluate_policy(test_conf, test_correct, flops, np.array(r.thresholds))
        sweep.append(SweepPoint(epsilon_pp=eps * 100, thresholds=r.thresholds, val=_outcome(r), test=_outcome(t)))
    return Policy(
        confidence=cfg.confidence,
        mode=cfg.mode,
        epsilon_pp=cfg.epsilon,
        budget=cfg.budget,
        z=cfg.z,
        thresholds=chosen.thresholds,
        val=_outcome(chosen),
        test=_outcome(on_test),
        sweep=sweep,
        exit_selection=selection,
    )


def _select_exits(
    model: MultiExitNet, spec: ArchitectureSpec, ev: Evaluated, shape: tuple[int, int, int], cfg: ExportConfig
) -> tuple[MultiExitNet, ArchitectureSpec, Evaluated, ExitSelection | None]:
    """The network with only the exits worth serving (`--exits select`, ResNets), and the record of the choice."""
    if cfg.exits == "all" or model.exit_blocks is None or model.num_exits < 2:
        return model, spec, ev, None
    costs = exit_costs(model, shape)
    conf, correct = _conf_and_correct(ev.val_logits, ev.val_y, ev.temps, cfg.confidence)
    chosen = select_exits(
        conf,
        correct,
        [c.stage_flops for c in costs],
        [c.head_flops for c in costs],
        cfg.epsilon / 100,
        cfg.mode,
        cfg.budget,
        cfg.z,
    )
    blocks = model.exit_blocks
    steps, kept = [], list(range(model.num_exits))
    for dropped, result in chosen.steps:
        kept = [k for k in kept if k != dropped]
        steps.append(
            SelectionStep(
                dropped_block=None if dropped is None else blocks[dropped],
                kept_blocks=[blocks[k] for k in kept],
                val=_outcome(result),
            )
        )
    record = ExitSelection(trained_blocks=list(blocks), kept_blocks=[blocks[k] for k in chosen.kept], steps=steps)
    log.info("exits kept after blocks %s of %s", record.kept_blocks, record.trained_blocks)
    model, spec = keep_exits(model, spec, chosen.kept)
    pick = chosen.kept
    ev = Evaluated(
        [ev.val_logits[k] for k in pick],
        ev.val_y,
        [ev.test_logits[k] for k in pick],
        ev.test_y,
        [ev.temps[k] for k in pick],
    )
    return model, spec, ev, record


def export(cfg: ExportConfig) -> Path:
    """Run the whole export and return the artifact directory."""
    state = load_checkpoint(cfg.checkpoint)
    train_cfg, data = state["config"], state["data_spec"]
    architecture = ArchitectureSpec.model_validate(state["model_spec"])
    model = architecture.build()
    model.load_state_dict(state["model"])
    model.eval()
    data_dir = cfg.data_dir or train_cfg["data_dir"]
    # An image folder is read as in training: its size and normalisation as recorded (a computed mean stays).
    folder = FolderOptions(
        data["size"], data["mean"], data["std"], skip_bad_images=bool(train_cfg.get("skip_bad_images")),
        channels=data["channels"],
    )  # fmt: skip
    bundle = load_data(
        train_cfg["dataset"], data_dir, train_cfg["val_size"], train_cfg["split_seed"], train_cfg["augment"], False,
        folder, data["classes"],
    )  # fmt: skip
    device = torch.device("cpu")
    val_logits, val_y = collect_logits(model, DataLoader(bundle.val, batch_size=512), device)
    test_logits, test_y = collect_logits(model, DataLoader(bundle.test, batch_size=512), device)
    # Without labels the final exit's predictions are the targets: calibration, thresholds and every
    # accuracy in the manifest are then agreement with the final exit (what the drift guard watches).
    val_y, test_y = targets_of(val_logits, val_y), targets_of(test_logits, test_y)
    ev = Evaluated(val_logits, val_y, test_logits, test_y, [fit_temperature(z, val_y) for z in val_logits])
    input_spec = InputSpec.model_validate(data)
    input_shape = (input_spec.channels, input_spec.size, input_spec.size)
    model, architecture, ev, selection = _select_exits(model, architecture, ev, input_shape, cfg)
    costs = exit_costs(model, input_shape)
    policy = _policy(ev, np.array([c.served_flops_fraction for c in costs]), cfg, selection)
    log.info("profiling latency")
    latency = profile_latency(model, input_shape, tuple(cfg.latency_batch_sizes), cfg.latency_repeats)
    # The ensemble of the exits served (its FLOPs below are theirs too), not of every exit trained.
    accs = {"val": accuracies(ev.val_logits, ev.val_y), "test": accuracies(ev.test_logits, ev.test_y)}
    body = ManifestBody(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        architecture=architecture,
        classes=data["classes"],
        input=input_spec,
        exits=_exit_entries(ev, costs, policy, latency),
        ensemble=Ensemble(
            val_accuracy=accs["val"]["ensemble"],
            test_accuracy=accs["test"]["ensemble"],
            flops_fraction=1.0 + sum(c.head_flops for c in costs[:-1]) / costs[-1].flops,
        ),
        policy=policy,
        latency_device=f"{device.type} ({torch.get_num_threads()} threads)",
        dataset=data["dataset"],
        training=train_cfg,
        code_version=code_version(),
    )
    return save_artifact(model, body, cfg.store, cfg.name, cfg.version, write_report)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = build_parser(ExportConfig, "anytime-export", __doc__ or "", positional=("checkpoint",))
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        path = export(ExportConfig(**args))
    except ValidationError as exc:
        sys.stderr.write(f"anytime-export: error: {settings_error(exc)}\n")
        return 2
    except (ArtifactError, DataError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"anytime-export: error: {exc}\n")
        return 2
    sys.stdout.write(f"artifact written to {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

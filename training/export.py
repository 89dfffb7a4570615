"""`anytime-export`: checkpoint → calibrated exits, chosen thresholds, latency profile → artifact.

Temperatures and thresholds are fitted on the validation split only; the test split is only
reported (per-exit accuracy and what the chosen policy gives there).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from models.artifact import ArtifactError, save_artifact
from models.confidence import MEASURES, confidence
from models.cost import ExitCost, exit_costs
from models.registry import build_model_from_spec
from training.calibration import ece_of_logits, fit_temperature
from training.checkpoint import load_checkpoint
from training.data import DataError, load_data
from training.evaluate import accuracies, collect_logits
from training.latency import profile_latency
from training.report import write_report
from training.thresholds import PolicyResult, evaluate_policy, select_thresholds

log = logging.getLogger("anytime.export")
SWEEP_EPSILONS = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)


def code_version() -> str:
    """`git describe` of the working tree when available, else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anytime-serve")
    except PackageNotFoundError:
        return "unknown"


def _conf_and_correct(
    logits: list[Tensor], targets: Tensor, temps: list[float], measure: str
) -> tuple[np.ndarray, np.ndarray]:
    conf = torch.stack([confidence(z, t, measure) for z, t in zip(logits, temps, strict=True)]).numpy()
    correct = torch.stack([z.argmax(1) == targets for z in logits]).numpy()
    return conf, correct


def _policy_dict(r: PolicyResult) -> dict[str, Any]:
    return {
        "accuracy": r.accuracy * 100,
        "mean_flops_fraction": r.mean_flops,
        "exit_rates": r.exit_rates,
        "loss_bound_pp": r.loss_bound * 100,
    }


@dataclass
class Evaluated:
    """Every exit's logits on the validation and test splits, with the fitted temperatures."""

    val_logits: list[Tensor]
    val_y: Tensor
    test_logits: list[Tensor]
    test_y: Tensor
    temps: list[float]


def _exit_entries(ev: Evaluated, costs: list[ExitCost], thresholds: list[float], latency: list[dict]) -> list[dict]:
    val_acc, test_acc = accuracies(ev.val_logits, ev.val_y), accuracies(ev.test_logits, ev.test_y)
    entries = []
    for k, c in enumerate(costs):
        entries.append(
            {
                "exit": k + 1,
                "temperature": ev.temps[k],
                "threshold": thresholds[k] if k < len(thresholds) else 0.0,  # the last exit always answers
                "params": c.params,
                "flops": c.flops,
                "flops_fraction": c.flops_fraction,
                "head_flops": c.head_flops,
                "latency_ms": latency[k],
                "val_accuracy": val_acc[f"exit{k + 1}"],
                "test_accuracy": test_acc[f"exit{k + 1}"],
                "val_ece_before": ece_of_logits(ev.val_logits[k], ev.val_y),
                "val_ece_after": ece_of_logits(ev.val_logits[k], ev.val_y, ev.temps[k]),
            }
        )
    return entries


def _policy(ev: Evaluated, flops: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Choose thresholds on val, report them on test, and sweep ε for the report."""
    val_conf, val_correct = _conf_and_correct(ev.val_logits, ev.val_y, ev.temps, args.confidence)
    test_conf, test_correct = _conf_and_correct(ev.test_logits, ev.test_y, ev.temps, args.confidence)
    chosen = select_thresholds(val_conf, val_correct, flops, args.epsilon / 100, args.mode, args.budget, z=args.z)
    on_test = evaluate_policy(test_conf, test_correct, flops, np.array(chosen.thresholds))
    sweep = []
    for eps in SWEEP_EPSILONS:
        r = select_thresholds(val_conf, val_correct, flops, eps, z=args.z)
        t = evaluate_policy(test_conf, test_correct, flops, np.array(r.thresholds))
        sweep.append(
            {"epsilon_pp": eps * 100, "thresholds": r.thresholds, "val": _policy_dict(r), "test": _policy_dict(t)}
        )
    return {
        "confidence": args.confidence,
        "mode": args.mode,
        "epsilon_pp": args.epsilon,
        "budget": args.budget,
        "z": args.z,
        "thresholds": chosen.thresholds,
        "val": _policy_dict(chosen),
        "test": _policy_dict(on_test),
        "sweep": sweep,
    }


def export(args: argparse.Namespace) -> Path:
    """Run the whole export and return the artifact directory."""
    state = load_checkpoint(Path(args.checkpoint))
    cfg, spec = state["config"], state["data_spec"]
    model = build_model_from_spec(state["model_spec"])
    model.load_state_dict(state["model"])
    model.eval()
    data_dir = args.data_dir or cfg["data_dir"]
    bundle = load_data(cfg["dataset"], data_dir, cfg["val_size"], cfg["split_seed"], cfg["augment"], False)
    device = torch.device("cpu")
    val_logits, val_y = collect_logits(model, DataLoader(bundle.val, batch_size=512), device)
    test_logits, test_y = collect_logits(model, DataLoader(bundle.test, batch_size=512), device)
    ev = Evaluated(val_logits, val_y, test_logits, test_y, [fit_temperature(z, val_y) for z in val_logits])
    input_shape = (spec["channels"], spec["size"], spec["size"])
    costs = exit_costs(model, input_shape)
    policy = _policy(ev, np.array([c.flops_fraction for c in costs]), args)
    log.info("profiling latency")
    latency = profile_latency(model, input_shape)
    accs = {"val": accuracies(val_logits, val_y), "test": accuracies(test_logits, test_y)}
    manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": state["model_spec"],
        "classes": spec["classes"],
        "input": {k: spec[k] for k in ("size", "channels", "color_mode", "resize", "mean", "std")},
        "exits": _exit_entries(ev, costs, policy["thresholds"], latency),
        "ensemble": {
            "val_accuracy": accs["val"]["ensemble"],
            "test_accuracy": accs["test"]["ensemble"],
            "flops_fraction": 1.0 + sum(c.head_flops for c in costs[:-1]) / costs[-1].flops,
        },
        "policy": policy,
        "latency_device": f"{device.type} ({torch.get_num_threads()} threads)",
        "dataset": spec["dataset"],
        "training": cfg,
        "code_version": code_version(),
    }
    return save_artifact(model, manifest, Path(args.store), args.name, args.version, write_report)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="anytime-export", description=__doc__)
    parser.add_argument("checkpoint", help="trainer checkpoint, e.g. runs/x/best.pt")
    parser.add_argument("--store", default="model_store", help="model store directory")
    parser.add_argument("--name", required=True, help="artifact name, e.g. fashion-mnist")
    parser.add_argument("--version", help="artifact version (default: next integer)")
    parser.add_argument("--epsilon", type=float, default=0.5, help="max accuracy loss vs the final exit, in pp")
    parser.add_argument(
        "--z",
        type=float,
        default=1.645,
        help="standard errors added to the validation accuracy loss (1.645: 95 %% one-sided; 0: none)",
    )
    parser.add_argument("--mode", choices=["accuracy", "budget"], default="accuracy")
    parser.add_argument("--budget", type=float, help="budget mode: target mean FLOPs fraction, e.g. 0.5")
    parser.add_argument("--confidence", choices=MEASURES, default="max_softmax")
    parser.add_argument("--data-dir", help="override the data directory recorded in the checkpoint")
    args = parser.parse_args(argv)
    if args.mode == "budget" and args.budget is None:
        parser.error("--mode budget needs --budget")
    try:
        path = export(args)
    except (ArtifactError, DataError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"anytime-export: error: {exc}\n")
        return 2
    sys.stdout.write(f"artifact written to {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

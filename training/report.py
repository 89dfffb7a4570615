"""The export report: `report.md` and `exit_profile.png` written next to an artifact."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from models.artifact import Manifest  # noqa: E402


def plot_curves(metrics: Path, path: Path) -> None:
    """A run's curves per exit from its metrics.jsonl: training loss share, training and validation accuracy."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    exits = sorted({int(k.removeprefix("loss_exit")) for k in records[-1] if k.startswith("loss_exit")})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("loss_exit{}", "training loss (the exit's share)"), ("train_acc_exit{}", "training accuracy (%)"),
              ("val_acc_exit{}", "validation accuracy (%)"))  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        for k in exits:
            values = [r.get(key.format(k)) for r in records]
            ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=f"exit {k}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_exit_profile(manifest: Manifest, path: Path) -> None:
    """Accuracy vs mean FLOPs (single exits, policy sweep, ensemble), ECE per exit, exit distribution."""
    exits, policy = manifest.exits, manifest.policy
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax1.plot([e.flops_fraction for e in exits], [e.test_accuracy for e in exits], "o-", label="single exit")
    for e in exits:
        ax1.annotate(
            f"exit {e.exit}",
            (e.flops_fraction, e.test_accuracy),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    sweep = sorted(policy.sweep, key=lambda s: s.test.mean_flops_fraction)
    ax1.plot(
        [s.test.mean_flops_fraction for s in sweep],
        [s.test.accuracy for s in sweep],
        "s--",
        label="anytime policy (ε sweep)",
    )
    if policy.test is not None:
        ax1.plot(
            [policy.test.mean_flops_fraction],
            [policy.test.accuracy],
            "r*",
            markersize=14,
            label=f"chosen (ε = {policy.epsilon_pp} pp)",
        )
    if manifest.ensemble is not None:
        ax1.plot(
            [manifest.ensemble.flops_fraction], [manifest.ensemble.test_accuracy], "D", label="ensemble of all exits"
        )
    ax1.set_xlabel("mean FLOPs (fraction of the full network)")
    ax1.set_ylabel("test top-1 accuracy (%)")
    ax1.set_title("Accuracy vs compute")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    idx = range(1, len(exits) + 1)
    width = 0.38
    ax2.bar([i - width / 2 for i in idx], [(e.val_ece_before or 0) * 100 for e in exits], width, label="before")
    ax2.bar([i + width / 2 for i in idx], [(e.val_ece_after or 0) * 100 for e in exits], width, label="after scaling")
    ax2.set_xlabel("exit")
    ax2.set_ylabel("ECE (%), 15 bins, validation")
    ax2.set_title("Calibration per exit")
    ax2.set_xticks(list(idx))
    ax2.legend(fontsize=8)
    rates = policy.test.exit_rates if policy.test is not None else [0.0] * len(exits)
    ax3.bar(list(idx), [r * 100 for r in rates], color="tab:green")
    ax3.set_xlabel("exit")
    ax3.set_ylabel("share of test images answered (%)")
    ax3.set_title("Exit distribution at the chosen thresholds")
    ax3.set_xticks(list(idx))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(manifest: Manifest) -> str:
    """The export report as Markdown."""
    p = manifest.policy
    lines = [
        f"# {manifest.name} v{manifest.version}: exit profile",
        "",
        f"`{manifest.architecture.name}` on {manifest.dataset}; thresholds chosen on the validation split "
        f"({p.mode} mode, ε = {p.epsilon_pp} pp as an upper bound at z = {p.z}, confidence "
        f"`{p.confidence}`), reported on the test set.",
        "",
        "![exit profile](exit_profile.png)",
        "",
        "| exit | params | FLOPs (of full) | temperature | threshold | val acc | test acc | ECE before → after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in manifest.exits:
        lines.append(
            f"| {e.exit} | {e.params or 0:,} | {(e.flops or 0) / 1e6:.1f} M ({e.flops_fraction or 0:.0%}) | "
            f"{e.temperature:.3f} | {e.threshold:.3f} | {e.val_accuracy or 0:.2f} | {e.test_accuracy or 0:.2f} | "
            f"{(e.val_ece_before or 0) * 100:.2f} % → {(e.val_ece_after or 0) * 100:.2f} % |"
        )
    if manifest.ensemble is not None:
        lines += ["", f"Ensemble of all exits: {manifest.ensemble.test_accuracy:.2f} % (test)."]
    if p.test is not None:
        lines += [
            "",
            f"Chosen policy on the test set: accuracy {p.test.accuracy:.2f} % at {p.test.mean_flops_fraction:.1%} of "
            "the full network's FLOPs (every head a request passes counted); exit distribution "
            + ", ".join(f"exit {i + 1}: {r:.1%}" for i, r in enumerate(p.test.exit_rates))
            + ".",
        ]
    lines += ["", "| ε (pp) | thresholds | val acc | test acc | test mean FLOPs |", "| --- | --- | --- | --- | --- |"]
    for s in p.sweep:
        th = ", ".join("never" if v >= 1 else f"{v:.3f}" for v in s.thresholds)
        lines.append(
            f"| {s.epsilon_pp:g} | {th} | {s.val.accuracy:.2f} | {s.test.accuracy:.2f} | "
            f"{s.test.mean_flops_fraction:.1%} |"
        )
    lines += _selection_lines(manifest)
    sizes = list(manifest.exits[0].latency_ms)
    if sizes:
        lines += ["", f"Latency (median ms per stage + head, {manifest.latency_device}):", ""]
        lines.append("| exit | " + " | ".join(f"batch {b}" for b in sizes) + " |")
        lines.append("|" + " --- |" * (len(sizes) + 1))
        for e in manifest.exits:
            cells = [f"{e.latency_ms[b].stage_ms:.2f} + {e.latency_ms[b].head_ms:.2f}" for b in sizes]
            lines.append(f"| {e.exit} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _selection_lines(manifest: Manifest) -> list[str]:
    """The exit selection: which trained exits are served, and what each elimination step gave on val."""
    sel = manifest.policy.exit_selection
    if sel is None:
        return []
    lines = [
        "",
        f"Exit selection: trained with exits after blocks {', '.join(map(str, sel.trained_blocks))}; serves the "
        f"exits after blocks {', '.join(map(str, sel.kept_blocks))} (each dropped exit lowered the validation mean "
        "cost, every passed head counted, at the same ε):",
        "",
        "| step | dropped exit (after block) | exits served | val acc | val mean FLOPs (served) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, step in enumerate(sel.steps):
        dropped = "–" if step.dropped_block is None else str(step.dropped_block)
        lines.append(
            f"| {i} | {dropped} | {', '.join(map(str, step.kept_blocks))} | {step.val.accuracy:.2f} | "
            f"{step.val.mean_flops_fraction:.1%} |"
        )
    return lines


def write_report(directory: Path, manifest: Manifest) -> None:
    """Write report.md and exit_profile.png into `directory`."""
    plot_exit_profile(manifest, directory / "exit_profile.png")
    (directory / "report.md").write_text(report_markdown(manifest))

"""Where a run came from: the code's version and the versions of what it ran on, for config.yaml,
every checkpoint and the exported artifact."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import torchvision


def code_version() -> str:
    """`git describe` of the working tree when available, else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anytime-serve")
    except PackageNotFoundError:
        return "unknown"


def provenance() -> dict[str, Any]:
    """The code version and the library versions of this process."""
    return {
        "code_version": code_version(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
    }

"""Triton's `perf_analyzer` (PyPI `perf-analyzer`) on this machine, whatever its glibc.

The wheel needs glibc 2.38 or newer. Where the host has it, perf_analyzer lives in a plain venv;
where it does not (Debian 12 has 2.36), in a venv inside a Debian 13 root made once with debootstrap
and run with chroot, which needs root. The chroot shares the host's network, so 127.0.0.1 is the
host's server. Files passed to it (`--input-data FILE`) are copied into the root first.

    python -m tools.perf_analyzer -m fashion-mnist -u 127.0.0.1:8000 --concurrency-range 1:4

ANYTIME_PA_HOME (default /var/tmp/anytime-perf-analyzer) holds the venv or the root (about 600 MB).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HOME = Path(os.environ.get("ANYTIME_PA_HOME", "/var/tmp/anytime-perf-analyzer"))
PACKAGE = "perf-analyzer>=2.59,<3"
MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"  # Debian 13: glibc 2.41
INSIDE = "/opt/pa"  # the venv's place inside the root
HOST_CAS = "/etc/ssl/certs/ca-certificates.crt"


class Unavailable(RuntimeError):
    """perf_analyzer cannot be had here: the message says why and what would make it work."""


def _glibc() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(p) for p in version.split(".")) if name == "glibc" and version else (0,)


def _run(argv: list[str], timeout: float) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise Unavailable(f"{' '.join(argv[:4])} … exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2000:]}")


def _venv(root: Path) -> Path:
    binary = root / "bin" / "perf_analyzer"
    if not binary.exists():
        _run([sys.executable, "-m", "venv", str(root)], 300)
        _run([str(root / "bin" / "pip"), "install", "-q", PACKAGE], 900)
    return binary


def _debian_root(root: Path) -> Path:
    if os.geteuid() != 0:
        raise Unavailable(
            f"glibc {'.'.join(map(str, _glibc()))} here; perf_analyzer needs 2.38, and the Debian 13 root that "
            "stands in for it needs root (debootstrap, chroot)"
        )
    if not (root / INSIDE.lstrip("/") / "bin" / "perf_analyzer").exists():
        if shutil.which("debootstrap") is None:
            raise Unavailable("debootstrap is not installed (Debian's `debootstrap`; make bench-triton installs it)")
        if not (root / "usr" / "bin" / "python3").exists():
            packages = "--include=python3,python3-venv,ca-certificates"
            _run(["debootstrap", "--variant=minbase", packages, SUITE, str(root), MIRROR], 1800)
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        # The root trusts what the host trusts (a proxy's own certificate authority, say).
        shutil.copy(HOST_CAS, root / HOST_CAS.lstrip("/"))
        _run(["chroot", str(root), "python3", "-m", "venv", INSIDE], 300)
        pip = ["chroot", str(root), "env", f"PIP_CERT={HOST_CAS}", f"{INSIDE}/bin/pip", "install", "-q", PACKAGE]
        _run(pip, 900)
    for mount in ("proc", "dev"):
        target = root / mount
        if subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0:
            _run(["mount", "--bind", f"/{mount}", str(target)], 30)
    return root


def command(args: list[str]) -> list[str]:
    """The argv that runs perf_analyzer with `args` here (installing it on first use); paths of existing
    files among `args` are rewritten to where the chroot sees them."""
    if _glibc() >= (2, 38):
        return [str(_venv(HOME / "venv")), *args]
    root = _debian_root(HOME / "root")
    inbox = root / "input"
    inbox.mkdir(exist_ok=True)
    rewritten = []
    for a in args:
        if os.path.isfile(a):
            shutil.copy(a, inbox / Path(a).name)
            a = f"/input/{Path(a).name}"
        rewritten.append(a)
    return ["chroot", str(root), f"{INSIDE}/bin/perf_analyzer", *rewritten]


def run(args: list[str], report: Path, timeout: float, cpu: int | None = None) -> subprocess.CompletedProcess:
    """Run perf_analyzer with `args` (pinned to `cpu` when given), its CSV report (`-f`) copied to `report`."""
    argv = command(args)
    if argv[0] == "chroot":  # perf_analyzer writes inside the root
        inside = f"/input/{report.name}"
        written = HOME / "root" / inside.lstrip("/")
    else:
        inside, written = str(report), report
    written.unlink(missing_ok=True)
    argv += ["-f", inside]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if written != report and written.exists():
        shutil.copy(written, report)
    return proc


def main() -> None:
    try:
        argv = command(sys.argv[1:])
    except Unavailable as exc:
        sys.exit(f"perf_analyzer: {exc}")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()

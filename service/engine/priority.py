"""Which of the worker's two threads runs the engine's steps on a CPU, in one process: one that yields
the core to the event loop (`worker_nice` steps lower) or one at the event loop's own priority.

A nice value weighs only within the server's scheduling group: its cgroup when the CPU controller
gives it one (a container, a systemd service with CPU accounting), else its session (Linux's
autogroup), else every process. Without a busy neighbour in that group the yielding thread is what
keeps the server working past its capacity: the event loop reads and refuses first. A busy process
at normal priority in the same group takes about ten times that thread's share, though, and the
server nearly stops (docs/server.md, "Deadlines"). Lowering a thread's nice value back needs a
privilege a server seldom has, so the worker has a thread at each priority and hands the steps
between them: to the fair thread while the other processes of its group use more than
`BUSY_OTHERS` of the cores the worker may run on, back to the yielding one once they have used less
than `QUIET_OTHERS` for `QUIET_S`.

What the group's other processes used is the group's CPU time less this process's, over windows of
`SAMPLE_S`: the cgroup's own count (cgroup v2 `cpu.stat`, v1 `cpuacct.usage`), the session's
processes' counts (/proc/<pid>/stat), or, with neither, the cores' busy time (/proc/stat); never
more than every other process used on the worker's cores.

Runs on the two worker threads of a server of one process (`EngineConfig.fair_when_shared`); the
engine process of several request processes keeps its one yielding thread, since the neighbours in
its group are its own request processes.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("anytime.engine")

SAMPLE_S = 1.0  # a window: /proc counts in ticks of 10 ms, and reading a session's processes costs about 2 ms
BUSY_OTHERS = 0.25  # the group's other processes used this share of the worker's cores: the fair thread
QUIET_OTHERS = 0.1  # at most this share for QUIET_S: the yielding thread again
QUIET_S = 3.0
FAILED_WAIT_S = 60.0  # after a failed read, the next try
PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in these ticks per second
# user, nice, system: not idle, iowait or a VM's steal, nor interrupts, whose time the kernel may
# account apart from the process that caused it (a server's own loopback traffic under load)
_BUSY_FIELDS = (0, 1, 2)


def _cgroup_usage_file() -> tuple[Path, float] | None:
    """This process's CPU cgroup's usage counter and its unit in seconds, when that cgroup is a scheduling
    group (the CPU controller on, not the root); else None."""
    try:
        lines = (PROC / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if path in ("", "/"):
            continue
        here = path.lstrip("/")
        if controllers == "":  # cgroup v2: a group of the scheduler only with the cpu controller enabled
            try:
                enabled = (CGROUP_ROOT / here / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if "cpu" in enabled:
                return CGROUP_ROOT / here / "cpu.stat", 1e-6
        elif {"cpu", "cpuacct"} <= set(controllers.split(",")):  # cgroup v1, co-mounted
            for mount in (controllers, "cpu,cpuacct", "cpuacct,cpu"):
                candidate = CGROUP_ROOT / mount / here / "cpuacct.usage"
                if candidate.exists():
                    return candidate, 1e-9
    return None


def _read_usage(source: tuple[Path, float]) -> float | None:
    path, unit = source
    try:
        text = path.read_text()
    except OSError:
        return None
    if path.name == "cpu.stat":
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * unit
        return None
    try:
        return int(text) * unit
    except ValueError:
        return None


def _session_ticks(session: int) -> dict[int, int]:
    """CPU time (utime + stime, in clock ticks) of every live process of `session`, by PID."""
    ticks = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session:
                ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return ticks


class _SessionCPU:
    """The CPU time a session's processes have used while watched, in seconds: by PID, so that a process
    that ends takes none of the others' time with it, and one that starts counts from its start."""

    def __init__(self, session: int) -> None:
        self.session = session
        self._ticks: dict[int, int] = {}
        self._total = 0

    def __call__(self) -> float:
        now = _session_ticks(self.session)
        self._total += sum(max(0, t - self._ticks.get(pid, 0)) for pid, t in now.items())
        self._ticks = now
        return self._total / CLOCK_TICKS


def _cores_busy_s(cores: set[int]) -> float | None:
    """Seconds the given cores have spent busy since boot, every process together (None: no /proc/stat)."""
    try:
        lines = (PROC / "stat").read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines[1:]:
        name, *fields = line.split()
        if not name.startswith("cpu"):
            break
        if name[3:].isdigit() and int(name[3:]) in cores:
            ticks += sum(int(fields[i]) for i in _BUSY_FIELDS)
    return ticks / CLOCK_TICKS


def _autogroup() -> bool:
    try:
        return (PROC / "sys" / "kernel" / "sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def process_cpu_s() -> float:
    """This process's CPU time (every thread), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _share(now: float, used: float, mine: float, last: tuple[float, float, float], cores: int) -> float:
    """Others' share of `cores` between `last` (wall, used, mine) and now."""
    return max(0.0, (used - last[1]) - (mine - last[2])) / (max(now - last[0], 1e-9) * cores)


class GroupNeighbours:
    """The share of the worker's cores that the other processes of this server's scheduling group used
    over the last window (`sample`). The cores' busy time comes first, from one read of /proc/stat: when
    other processes barely used the cores, none of the group did either, and a session's processes
    (a scan of /proc, about 2 ms with a hundred processes) are not read."""

    def __init__(self, cores: set[int]) -> None:
        self.cores = cores
        cgroup = _cgroup_usage_file()
        session = os.getsid(0)
        self._group: Callable[[], float | None] | None
        if cgroup is not None:
            self.kind, self._group = "cgroup", lambda: _read_usage(cgroup)
        elif _autogroup():
            self.kind, self._group = "session", _SessionCPU(session)
        else:
            self.kind, self._group = "every process", None
        self._last_cores: tuple[float, float, float] | None = None  # wall, the cores' busy time, this process's
        self._last_group: tuple[float, float, float] | None = None  # wall, the group's CPU time, this process's

    def sample(self, now: float) -> float | None:
        """The others' share since the last call (None: nothing to compare with yet, or nothing to read)."""
        busy, mine = _cores_busy_s(self.cores), process_cpu_s()
        last, self._last_cores = self._last_cores, (now, busy, mine) if busy is not None else None
        if busy is None or last is None:
            return None
        on_cores = _share(now, busy, mine, last, len(self.cores))
        if self._group is None or on_cores <= QUIET_OTHERS:
            self._last_group = None
            return on_cores
        group = self._group()
        last, self._last_group = self._last_group, (now, group, mine) if group is not None else None
        if group is None or last is None:
            return None  # the group is read from now on: the next window says
        return min(on_cores, _share(now, group, mine, last, len(self.cores)))


class Baton:
    """Which worker thread runs the steps: the yielding one, unless other processes keep the worker's
    cores busy. Both threads call `turn` before each step; only the holder's call returns True."""

    def __init__(self, cores: set[int]) -> None:
        self.yielding = True  # the yielding thread holds it
        self.others = GroupNeighbours(cores)
        self._cond = threading.Condition()
        self._next = 0.0
        self._quiet_since: float | None = None

    def turn(self, yielding: bool) -> bool:
        """True: the calling thread (the yielding one or not) runs the next step. False: it waited for its
        turn (at most half a second) or has just handed it over; check for a stop and ask again."""
        with self._cond:
            if yielding != self.yielding:
                self._cond.wait(timeout=0.5)
                return False
        now = time.monotonic()
        if now < self._next:
            return True
        self._next = now + SAMPLE_S
        try:
            others = self.others.sample(now)
        except Exception:  # what /proc says must never stop the worker
            log.exception("reading the scheduling group's CPU time failed; the worker keeps its thread")
            self._next = now + FAILED_WAIT_S
            others = None
        choice = self.choose(others, now)
        if choice == yielding:
            return True
        log.warning(
            "the worker's steps go to its %s thread: other processes of the server's scheduling group (%s) "
            "used %.0f %% of its cores over the last %.0f s",
            "yielding" if choice else "fair",
            self.others.kind,
            100 * (others or 0.0),
            SAMPLE_S,
        )
        with self._cond:
            self.yielding = choice
            self._cond.notify_all()
        return False

    def choose(self, others: float | None, now: float) -> bool:
        """Whether the yielding thread should hold the turn, given others' share of the last window."""
        if others is None:
            return self.yielding
        if others > BUSY_OTHERS:
            self._quiet_since = None
            return False
        if others > QUIET_OTHERS:
            self._quiet_since = None
            return self.yielding
        if self._quiet_since is None:
            self._quiet_since = now
        return self.yielding or now - self._quiet_since >= QUIET_S

    def release(self) -> None:
        """Wake a thread waiting for its turn (the worker is stopping)."""
        with self._cond:
            self._cond.notify_all()

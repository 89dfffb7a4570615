"""The worker's two threads on a CPU (service/engine/priority.py): the one that yields to the event loop runs
the steps, unless other processes of the server's scheduling group keep its cores busy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.artifact import load_artifact
from service.engine import Engine, EngineConfig, Job, priority
from service.engine.priority import BUSY_OTHERS, QUIET_OTHERS, QUIET_S, Baton, GroupNeighbours
from service.metrics import Metrics
from service.options import InferenceOptions
from tests.helpers import make_artifact


def test_the_fair_thread_takes_over_while_neighbours_are_busy_and_hands_back_after_a_quiet_spell() -> None:
    baton = Baton({0})
    assert baton.choose(None, 0.0) is True  # nothing measured yet: the yielding thread
    assert baton.choose(QUIET_OTHERS / 2, 1.0) is True
    assert baton.choose(BUSY_OTHERS + 0.1, 2.0) is False
    baton.yielding = False  # `turn` hands it over
    assert baton.choose(None, 3.0) is False  # nothing to read keeps the choice
    assert baton.choose(QUIET_OTHERS / 2, 4.0) is False  # quiet, but not for long enough
    assert baton.choose((QUIET_OTHERS + BUSY_OTHERS) / 2, 4.5) is False  # in between: the quiet spell restarts
    assert baton.choose(QUIET_OTHERS / 2, 5.0) is False
    assert baton.choose(QUIET_OTHERS / 2, 5.0 + QUIET_S - 0.1) is False
    assert baton.choose(QUIET_OTHERS / 2, 5.0 + QUIET_S) is True


def test_others_share_is_the_groups_cpu_less_this_process_and_read_only_when_the_cores_are_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cores, mine, group, reads = [100.0], [3.0], [10.0], []
    monkeypatch.setattr(priority, "_cores_busy_s", lambda _cores: cores[0])
    monkeypatch.setattr(priority, "process_cpu_s", lambda: mine[0])
    neighbours = GroupNeighbours({0, 1})
    neighbours._group = lambda: reads.append(1) or group[0]
    assert neighbours.sample(100.0) is None  # the first call only starts the window
    cores[0], mine[0] = 100.55, 3.5  # two cores, 1 s: others used 0.05 s of 2, quiet
    assert neighbours.sample(101.0) == pytest.approx(0.025) and not reads  # the group is not read
    cores[0], mine[0], group[0] = 102.05, 4.0, 10.9  # others used 1 s of the cores: whose?
    assert neighbours.sample(102.0) is None and reads  # the group's count starts here
    cores[0], mine[0], group[0] = 103.55, 4.5, 12.1  # the group ran 1.2 s: 0.7 of it others'
    assert neighbours.sample(103.0) == pytest.approx(0.35)
    cores[0], mine[0], group[0] = 105.05, 5.0, 12.8  # busy cores, but the group only this process
    assert neighbours.sample(104.0) == pytest.approx(0.1)
    cores[0], mine[0], group[0] = 105.15, 5.2, 13.0  # the process alone (counts in ticks can cross): never below 0
    assert neighbours.sample(105.0) == 0.0


@pytest.mark.parametrize(
    ("cgroup", "controllers", "autogroup", "kind"),
    [
        ("0::/system.slice/anytime.service\n", "cpu memory pids", "1", "cgroup"),  # v2, with the cpu controller
        ("0::/system.slice/anytime.service\n", "memory pids", "1", "session"),  # v2 without it: not a group
        ("4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n", "", "1", "cgroup"),  # v1
        ("0::/\n", "", "1", "session"),  # the root group: the session's autogroup
        ("1:cpu:/\n2:cpuacct:/\n", "", "0", "every process"),  # no autogroup: every process on the cores
    ],
)
def test_the_group_is_the_cgroup_else_the_session_else_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cgroup: str, controllers: str, autogroup: str, kind: str
) -> None:
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "sys" / "kernel").mkdir(parents=True)
    (proc / "sys" / "kernel" / "sched_autogroup_enabled").write_text(autogroup + "\n")
    service = cgroups / "system.slice" / "anytime.service"
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text(controllers + "\n")
    (service / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\n")
    (cgroups / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    (cgroups / "cpu,cpuacct" / "docker" / "abc" / "cpuacct.usage").write_text("2500000000\n")
    monkeypatch.setattr(priority, "PROC", proc)
    monkeypatch.setattr(priority, "CGROUP_ROOT", cgroups)
    neighbours = GroupNeighbours({0})
    assert neighbours.kind == kind
    if kind == "cgroup":
        assert neighbours._group is not None and neighbours._group() == pytest.approx(2.5)


def _worker_threads_nice(engine: Engine) -> tuple[int, int]:
    threads = (engine._thread, engine._fair_thread)
    assert all(t is not None and t.native_id is not None for t in threads)
    return tuple(os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threads)  # type: ignore[union-attr,return-value]


def test_a_busy_process_of_the_servers_own_group_on_its_core_hands_the_steps_to_the_fair_thread(
    tmp_path: Path,
) -> None:
    """A busy loop at normal priority, started from the same session (so in the same scheduling group
    whatever the kernel's grouping) and pinned to the worker's core: within a few windows the fair thread
    runs the steps, and after the loop stops, the yielding thread again."""
    core = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})  # this thread only: the engine's threads inherit it
    busy: subprocess.Popen[bytes] | None = None
    try:
        artifact = load_artifact(make_artifact(tmp_path, "m", "test_tiny"))
        config = EngineConfig(worker_nice=10, fair_when_shared=True)
        engine = Engine(artifact, torch.device("cpu"), Metrics().for_model("m", "1", "cpu"), config)
        engine.start(warmup=False)
        baton = engine.worker.baton
        assert baton is not None
        base = os.getpriority(os.PRIO_PROCESS, 0)
        deadline = time.monotonic() + 5
        while _worker_threads_nice(engine) != (min(19, base + 10), base):
            assert time.monotonic() < deadline
            time.sleep(0.01)

        async def serve_until(done: object, limit_s: float) -> int:
            """Submit one job every 10 ms until `done()` or `limit_s`; the number answered."""
            answered, end = 0, time.monotonic() + limit_s
            while not done() and time.monotonic() < end:  # type: ignore[operator]
                answer = await engine.submit(Job(torch.randn(1, 28, 28), InferenceOptions.now()))
                answered += answer.exit >= 1
                await asyncio.sleep(0.01)
            return answered

        assert baton.yielding
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(busy.pid, {core})
        answered = asyncio.run(serve_until(lambda: not baton.yielding, 8.0))
        assert not baton.yielding, "the fair thread never took over beside a busy process of the same group"
        assert answered > 0
        busy.kill()
        busy.wait()
        busy = None
        answered = asyncio.run(serve_until(lambda: baton.yielding, QUIET_S + 5.0))
        assert baton.yielding, "the yielding thread did not take the steps back once the neighbour stopped"
        engine.stop(1.0)
        assert not engine.alive and engine._fair_thread is not None and not engine._fair_thread.is_alive()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        os.sched_setaffinity(0, before)


def test_a_sessions_cpu_counts_by_process_so_one_that_ends_takes_nothing_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scans = iter([{1: 100, 2: 500}, {1: 150, 3: 20}, {1: 150, 3: 20}])
    monkeypatch.setattr(priority, "_session_ticks", lambda _session: next(scans))
    monkeypatch.setattr(priority.os, "sysconf", lambda _name: 100)
    session = priority._SessionCPU(7)
    first = session()
    assert session() - first == pytest.approx(0.7)  # pid 1 ran 50 ticks, pid 3 (new) 20; pid 2 ended
    assert session() - first == pytest.approx(0.7)  # nothing ran

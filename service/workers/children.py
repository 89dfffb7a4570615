"""What every child process of several request processes runs first, and the entry points of both kinds.

The supervisor (supervisor.py) spawns them: `engine_main` (the engine process: the registry and its
engines, service/workers/host.py) and `request_main` (a request process: the app of service/app.py
over a `RemoteRegistry`, on the HTTP socket the supervisor bound). Each runs in its own process, on
its main thread; a watch thread ends it if the supervisor dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Listener

import torch

from models.artifact import ArtifactError
from service.app import build, start_registry
from service.config import ServiceSettings
from service.drain import DRAIN_SIGNAL, draining_server
from service.exits import FAILED, cannot_serve
from service.metrics import Metrics
from service.registry import BudgetExceeded, freeze_heap
from service.workers.host import EngineHost
from service.workers.remote import RemoteRegistry

ORPHAN_POLL_S = 0.5  # how often a child looks whether its supervisor is still there


def child_setup(settings_json: str, role: str, restarted: bool) -> tuple[ServiceSettings, Metrics]:
    """What every child process does first: its settings, logging, torch threads, its metrics (counting
    itself as a restart of `role` when it replaces one that died), and the watch on its supervisor."""
    orphan_watch()
    settings = ServiceSettings.model_validate_json(settings_json)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    metrics = Metrics()
    if restarted:
        metrics.worker_restarts.labels(role).inc()
    return settings, metrics


def orphan_watch() -> None:
    """End this process if its supervisor dies (SIGKILL leaves no time to stop it): it is reparented."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os._exit(FAILED)

    threading.Thread(target=watch, name="anytime-orphan-watch", daemon=True).start()


def request_main(
    settings_json: str, address: str, authkey: bytes, sock: socket.socket, index: int, restarted: bool
) -> None:
    """Entry point of a request process."""
    settings, metrics = child_setup(settings_json, "request", restarted)
    registry = RemoteRegistry(settings, metrics, address, authkey, index)
    app, stack = build(settings, registry)
    draining_server(settings, app, stack, bind=False, supervised=True).run(sockets=[sock])


def engine_main(settings_json: str, address: str, authkey: bytes, expected: int, restarted: bool) -> None:
    """Entry point of the engine process: load and warm the models, then serve the request processes."""
    settings, metrics = child_setup(settings_json, "engine", restarted)
    try:
        registry = start_registry(settings, metrics)
    except (ArtifactError, BudgetExceeded, RuntimeError) as exc:
        raise SystemExit(cannot_serve(f"cannot serve: {exc}")) from exc
    freeze_heap()
    listener = Listener(address, "AF_UNIX", authkey=authkey)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # to the process group: the supervisor's to act on
            loop.add_signal_handler(sig, lambda: None)
        loop.add_signal_handler(DRAIN_SIGNAL, stop.set)
        await EngineHost(settings, registry, expected).serve(listener, stop)

    asyncio.run(run())

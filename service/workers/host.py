"""The engine process: one registry, one engine per model on the device, fed by every request process.

It loads and warms the models (CUDA graphs included), listens on a Unix socket in the server's
private directory, and keeps a `WorkerLink` per request process: a reader thread turns each job
descriptor into an engine job over the request process's shared memory, and the link is the job's
`Sink`, so the answers of one engine stage go back in one message. A deadline watch answers, at a
job's deadline, from the last exit it passed when the engine has not answered (a long stage). It
tells every request process which models it serves and whether all of them have warmed up once
(readiness), and on SIGTERM finishes the queued work before it exits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import signal
import sys
import threading
import time
from multiprocessing.connection import Listener
from typing import Any

import torch

from models.artifact import ArtifactError
from service.config import ServiceSettings
from service.drain import DRAIN_SIGNAL
from service.engine import Answer, Job
from service.engine.jobs import Outcome
from service.errors import NOT_READY, ServiceError, internal_error, to_error
from service.registry import BudgetExceeded, ModelRegistry
from service.served import ServedModel
from service.workers.ipc import ArenaView, Link

log = logging.getLogger("anytime.engine-process")


class WorkerLink:
    """The engine process's end of one request process's link; the sink of that process's jobs."""

    def __init__(self, host: EngineHost, link: Link) -> None:
        self.host, self.link = host, link
        self.index = -1
        self.arena: ArenaView | None = None
        self._jobs: dict[int, tuple[int, ServedModel]] = {}  # id(job) → (job id, model)
        self._lock = threading.Lock()

    def deliver(self, settled: list[tuple[Job, Outcome]]) -> None:
        """Send the answers of one stage (each job answered once: the deadline watch may race the engine)."""
        items = []
        released = []
        with self._lock:
            for job, outcome in settled:
                if job.done:
                    continue
                job.done = True
                job_id, model = self._jobs.pop(id(job), (None, None))
                if job_id is None:
                    continue
                released.append(model)
                if isinstance(outcome, Answer):
                    items.append((job_id, outcome, None, None, None))
                else:
                    error = to_error(outcome) or internal_error()
                    items.append((job_id, None, error.code, error.message, error.retry_after_s))
        for model in released:
            model.release(self.host.loop)
        if items:
            self.link.send(("answers", items))

    def read(self) -> None:
        """Reader thread: hello, jobs, readiness and view requests, until the request process goes away."""
        while True:
            message = self.link.recv()
            if message is None:
                break
            kind = message[0]
            if kind == "infer":
                for item in message[1]:
                    self._infer(*item)
            elif kind == "hello":
                _, self.index, pid, arena, slot_bytes = message
                self.arena = ArenaView(arena, slot_bytes)
                log.info("request process %d (pid %d) connected", self.index, pid)
            elif kind == "ready":
                self.host.worker_ready(self)
            elif kind == "view":
                self._view(*message[1:])
        self.host.drop(self)
        with self._lock:  # jobs still running: nobody to answer, leases go
            jobs, self._jobs = self._jobs, {}
        for _, model in jobs.values():
            model.release(self.host.loop)
        if self.arena is not None:
            self.arena.close()

    def _infer(
        self,
        job_id: int,
        name: str,
        version: str,
        slot: int | None,
        shape: tuple[int, ...],
        inline: bytes | None,
        options: Any,
    ) -> None:
        try:
            model = self.host.registry.get(name, version)
            if not model.engine.alive:
                raise ServiceError(f"model {name} is not running", NOT_READY)
            if slot is not None and self.arena is not None:
                x = self.arena.tensor(slot, shape)
            else:
                x = torch.frombuffer(bytearray(inline or b""), dtype=torch.float32).view(shape)
            job = Job(x, options)
            model.acquire()
            with self._lock:
                self._jobs[id(job)] = (job_id, model)
            try:
                model.engine.submit_to(job, self)
            except Exception:
                with self._lock:
                    self._jobs.pop(id(job), None)
                model.release(self.host.loop)
                raise
            if options.client_deadline:
                self.host.watch.add(job, model, self)
        except Exception as exc:
            error = to_error(exc) or internal_error()
            if error is not exc and not isinstance(exc, ServiceError):
                log.exception("job failed before the engine")
            self.link.send(("answers", [(job_id, None, error.code, error.message, error.retry_after_s)]))

    def _view(self, call_id: int, name: str, version: str) -> None:
        try:
            body = self.host.registry.get(name, version).describe().model_dump(mode="json")
            self.link.send(("view", call_id, body, None))
        except ServiceError as exc:
            self.link.send(("view", call_id, None, exc.message))


class DeadlineWatch:
    """At each watched job's deadline: if the engine has not answered, answer from the last exit passed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Job, ServedModel, WorkerLink]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="anytime-deadlines", daemon=True).start()

    def add(self, job: Job, model: ServedModel, link: WorkerLink) -> None:
        with self._cond:
            heapq.heappush(self._heap, (job.deadline, next(self._seq), job, model, link))
            if self._heap[0][2] is job:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                _, _, job, model, link = heapq.heappop(self._heap)
            if job.done or job.passed is None:
                continue  # answered already, or nothing to answer from (the request process answers 504)
            try:
                answer = model.engine.answer_now(job)
            except Exception:  # the job's row went away meanwhile
                continue
            link.deliver([(job, answer)])


class EngineHost:
    """The engine process's state: the registry, the links, and readiness."""

    def __init__(self, settings: ServiceSettings, registry: ModelRegistry, expected: int) -> None:
        self.settings, self.registry, self.expected = settings, registry, expected
        self.links: list[WorkerLink] = []
        self.warmed: set[int] = set()
        self.ready = False
        self.watch = DeadlineWatch()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def state(self) -> tuple[Any, ...]:
        models = [(m.name, m.version, str(m.artifact.path), m.device) for m in self.registry.served()]
        return ("state", self.ready, models, self.registry.default)

    def broadcast(self) -> None:
        message = self.state()
        with self._lock:
            links = list(self.links)
        for link in links:
            link.link.send(message)

    def accept(self, listener: Listener) -> None:
        """Accept thread: each request process that connects gets a link and a reader thread."""
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError):
                return
            link = WorkerLink(self, Link(conn))
            with self._lock:
                self.links.append(link)
            link.link.send(self.state())
            threading.Thread(target=link.read, name="anytime-link", daemon=True).start()

    def worker_ready(self, link: WorkerLink) -> None:
        with self._lock:
            self.warmed.add(link.index)
            became = not self.ready and len(self.warmed) >= self.expected
            self.ready = self.ready or became
        if became:
            log.info("all %d request processes are warm: ready", self.expected)
            self.broadcast()
        elif self.ready:
            link.link.send(self.state())

    def drop(self, link: WorkerLink) -> None:
        with self._lock:
            if link in self.links:
                self.links.remove(link)
        log.info("request process %d disconnected", link.index)

    async def serve(self, listener: Listener, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.registry.on_change = lambda: self.loop.call_soon_threadsafe(self.broadcast) if self.loop else None
        threading.Thread(target=self.accept, args=(listener,), name="anytime-accept", daemon=True).start()
        watcher = asyncio.create_task(self.registry.background(stop.is_set))
        await stop.wait()
        watcher.cancel()
        listener.close()
        await self.registry.stop()  # the queued work is answered first
        with self._lock:
            links = list(self.links)
        for link in links:
            link.link.close()


def host_main(settings_json: str, address: str, authkey: bytes, expected: int, restarted: bool = False) -> None:
    """Entry point of the engine process (started by the supervisor)."""
    from service.app import start_registry
    from service.registry import freeze_heap
    from service.workers.supervisor import child_setup

    settings, metrics = child_setup(settings_json, "engine", restarted)
    try:
        registry = start_registry(settings, metrics, engine_process=True)
    except (ArtifactError, BudgetExceeded, RuntimeError) as exc:
        sys.stderr.write(f"anytime-serve: cannot serve: {exc}\n")
        raise SystemExit(2) from exc
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

"""The engine process: one registry, one engine per model on the device, fed by every request process.

It loads and warms the models (CUDA graphs included), listens on a Unix socket in the server's
private directory, and keeps a `WorkerLink` per request process: a reader thread turns each
`JobRecord` into an engine job over the request process's shared memory, and the link is the job's
`Sink`, so the answers of one engine stage go back in one message, as do the answers of the exits
that rows with a deadline pass (the request process answers from them at the deadline, as a single
process does). After every worker step each engine publishes its `Forecast` on the model's board,
from which request processes refuse before decoding. It tells every request process which models
it serves and whether all of them have warmed up once (readiness), and on SIGTERM finishes the
queued work before it exits.

Threads: the accept thread, one reader thread per request process (admission runs there), each
engine's worker thread (answers and forecasts), and the asyncio loop that watches the store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from multiprocessing.connection import Listener
from typing import Any

import torch

from service.config import ServiceSettings
from service.engine import Answer, Engine, Job
from service.engine.jobs import Outcome as EngineOutcome
from service.errors import NOT_READY, ServiceError, internal_error, to_error
from service.registry import ModelRegistry
from service.served import ServedModel
from service.workers.ipc import ArenaView, ForecastBoard, JobRecord, Link, ModelState, Outcome, Passed

log = logging.getLogger("anytime.engine-process")


class WorkerLink:
    """The engine process's end of one request process's link; the sink of that process's jobs."""

    def __init__(self, host: EngineHost, link: Link) -> None:
        self.host, self.link = host, link
        self.index = -1
        self.arena: ArenaView | None = None
        self._jobs: dict[int, tuple[int, ServedModel]] = {}  # id(job) → (job id, model)
        # The versions this request process may still send jobs for: each holds a lease, so that a version
        # replaced in the store is not stopped until the request process says it let go ("released").
        self.held: dict[tuple[str, str], ServedModel] = {}
        self._lock = threading.Lock()

    def send_state(self, message: tuple[Any, ...], models: list[ServedModel]) -> None:
        """Tell the request process which models are served, holding each version it now knows."""
        with self._lock:
            for model in models:
                if (model.name, model.version) not in self.held:
                    model.acquire()
                    self.held[(model.name, model.version)] = model
        self.link.send(message)

    def _released(self, name: str, version: str) -> None:
        with self._lock:
            model = self.held.pop((name, version), None)
        if model is not None:
            model.release(self.host.loop)

    def deliver(self, settled: list[tuple[Job, EngineOutcome]]) -> None:
        """Send the answers of one stage (each job answered once)."""
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
                    items.append(Outcome(job_id, outcome))
                else:
                    error = to_error(outcome) or internal_error()
                    items.append(Outcome(job_id, None, error.code, error.message, error.retry_after_s))
        for model in released:
            model.release(self.host.loop)
        if items:
            self.link.send(("answers", items))

    def passed(self, jobs: list[Job]) -> None:
        """Rows that went on past an exit: their answer from it (`Job.fallback`, made by the worker for a
        client's deadline), for the request process to answer with at the deadline."""
        with self._lock:
            entries = [(self._jobs.get(id(job)), job.fallback) for job in jobs]
        items = [Passed(entry[0], answer) for entry, answer in entries if entry is not None and answer is not None]
        if items:
            self.link.send(("passed", items))

    def read(self) -> None:
        """Reader thread: hello, jobs, readiness and view requests, until the request process goes away."""
        while True:
            message = self.link.recv()
            if message is None:
                break
            kind = message[0]
            if kind == "infer":
                for record in message[1]:
                    self._infer(record)
            elif kind == "hello":
                _, self.index, pid, arena, slot_bytes = message
                self.arena = ArenaView(arena, slot_bytes)
                log.info("request process %d (pid %d) connected", self.index, pid)
            elif kind == "ready":
                self.host.worker_ready(self)
            elif kind == "view":
                self._view(*message[1:])
            elif kind == "control":
                self._control(*message[1:])
            elif kind == "released":
                self._released(*message[1:])
        self.host.drop(self)
        with self._lock:  # jobs still running: nobody to answer, leases go
            jobs, self._jobs = self._jobs, {}
            held, self.held = list(self.held.values()), {}
        for model in [m for _, m in jobs.values()] + held:
            model.release(self.host.loop)
        if self.arena is not None:
            self.arena.close()

    def _infer(self, record: JobRecord) -> None:
        try:
            with self._lock:
                model = self.held.get((record.model, record.version))
            if model is None:  # a version this process was never told of
                model = self.host.registry.get(record.model, record.version)
            if not model.engine.alive:
                raise ServiceError(f"model {record.model} is not running", NOT_READY)
            if record.slot is not None and self.arena is not None:
                x = self.arena.tensor(record.slot, record.shape)
            else:
                x = torch.frombuffer(bytearray(record.inline or b""), dtype=torch.float32).view(record.shape)
            job = Job(x, record.options, shadow=record.shadow, answer_by=record.answer_by)
            model.acquire()
            with self._lock:
                self._jobs[id(job)] = (record.id, model)
            try:
                model.engine.submit_to(job, self, checked=record.checked)
            except Exception:
                with self._lock:
                    self._jobs.pop(id(job), None)
                model.release(self.host.loop)
                raise
        except Exception as exc:
            error = to_error(exc) or internal_error()
            if error is not exc and not isinstance(exc, ServiceError):
                log.exception("job failed before the engine")
            self.link.send(("answers", [Outcome(record.id, None, error.code, error.message, error.retry_after_s)]))

    def _view(self, call_id: int, name: str, version: str) -> None:
        try:
            body = self.host.registry.get(name, version).describe().model_dump(mode="json")
            self.link.send(("view", call_id, body, None))
        except ServiceError as exc:
            self.link.send(("view", call_id, None, exc.message))

    def _control(self, call_id: int, action: str, name: str) -> None:
        """Repository control (index, load, unload) on the engine process's event loop; the answer goes
        after the new state, so the request process knows of a load when it hears it is done."""
        loop = self.host.loop
        if loop is None:
            self.link.send(("control", call_id, None, NOT_READY.code, "the engine process is starting"))
            return

        async def run() -> None:
            registry = self.host.registry
            try:
                if action == "index":
                    result: Any = await registry.repository_index()
                else:
                    result = await (registry.load(name) if action == "load" else registry.unload(name))
            except Exception as exc:
                error = to_error(exc) or internal_error()
                self.link.send(("control", call_id, None, error.code, error.message))
                return
            self.host.broadcast()
            self.link.send(("control", call_id, result, None, None))

        asyncio.run_coroutine_threadsafe(run(), loop)


class EngineHost:
    """The engine process's state: the registry, the links, and readiness."""

    def __init__(self, settings: ServiceSettings, registry: ModelRegistry, expected: int) -> None:
        self.settings, self.registry, self.expected = settings, registry, expected
        self.links: list[WorkerLink] = []
        self.warmed: set[int] = set()
        self.ready = False
        self.boards: dict[tuple[str, str], tuple[ForecastBoard, Engine]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def state(self) -> tuple[tuple[Any, ...], list[ServedModel]]:
        """The state message, and the versions it announces."""
        served = self.registry.served()
        models = [ModelState(m.name, m.version, str(m.artifact.path), m.device, self._board(m)) for m in served]
        return ("state", self.ready, models, self.registry.default), served

    def _board(self, model: ServedModel) -> str:
        """The board `model`'s engine publishes its forecast on (made at its first state message)."""
        with self._lock:
            entry = self.boards.get((model.name, model.version))
            if entry is None:
                engine = model.engine
                board = ForecastBoard.create(engine.max_batch, engine.config.queue_size)
                entry = self.boards[(model.name, model.version)] = (board, engine)
                engine.publish(lambda: board.write(engine.forecast()), board.set_in_flight)
            return entry[0].spec

    def _retire_boards(self, everything: bool = False) -> None:
        """Close the boards of versions no longer served (a retired version's engine may still finish the
        requests it holds: it stops publishing first); request processes drop them at the next state."""
        served = set() if everything else {(m.name, m.version) for m in self.registry.served()}
        with self._lock:
            gone = [self.boards.pop(key) for key in list(self.boards) if key not in served]
        for board, engine in gone:
            engine.publish(None)
            board.close()

    def broadcast(self) -> None:
        message, served = self.state()
        self._retire_boards()
        with self._lock:
            links = list(self.links)
        for link in links:
            link.send_state(message, served)

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
            link.send_state(*self.state())
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
            link.send_state(*self.state())

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
        self._retire_boards(everything=True)

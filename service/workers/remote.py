"""A request process's side: the engine process's registry and engines, as the data plane sees them.

`RemoteRegistry` keeps a link to the engine process (reconnecting when it restarts), mirrors the
models it serves (reading each version's manifest for classes, input spec and preprocessing; no
weights are loaded here), and sends jobs: each input is copied into a slot of this process's
shared-memory arena and described in a `JobRecord`; the jobs submitted within one turn of the
event loop go in one message. Answers come back one message per engine stage and complete the
futures on the event loop, errors rebuilt into the engine's typed errors; the answers of exits a
row passed are kept on its job, so that the data plane answers from them at the deadline as it
does in one process. The check before decoding reads the model's forecast board, and counts the
requests this process let through and has not submitted yet as in flight (`Holds`, admission.py);
a job it let through says so, and the engine process admits it as one process admits a checked job.

Runs in a request process: on its event loop, and the link's reader thread (`_read`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from models.artifact import read_manifest
from service.config import ServiceSettings
from service.engine import Answer, Job
from service.engine.admission import Holds, precheck_forecast, unreached
from service.engine.answers import timed_at
from service.engine.jobs import engine_error
from service.errors import NOT_READY, ServiceError
from service.metrics import Metrics
from service.options import InferenceOptions
from service.registry import ModelNotFound
from service.schemas import ModelView
from service.served import Served, held
from service.workers.ipc import KINDS, Arena, ForecastBoard, JobRecord, Link, ModelState, Outcome, Passed

log = logging.getLogger("anytime.worker")
SLOTS = 128  # inputs in flight per request process before they travel inline instead
CONTROL_TIMEOUT_S = 600.0  # a load warms the model up (minutes for a large one on a CPU); an unload drains it


class RemoteEngine:
    """The data plane's engine client for a model whose engine runs in the engine process."""

    def __init__(self, registry: RemoteRegistry, state: ModelState, num_exits: int) -> None:
        self.registry, self.name, self.version, self.num_exits = registry, state.name, state.version, num_exits
        self.board_spec = state.board
        self.board = ForecastBoard.attach(state.board) if state.board else None
        # The forecast counts the jobs the engine process admitted as of its last publication, and two
        # request processes check at once: the places this one's checks let through count as in flight.
        # A job sent with its place held is admitted by the engine process as one checked in its own.
        self.holds = Holds()

    @property
    def alive(self) -> bool:
        return self.registry.connected

    def submit(self, job: Job) -> asyncio.Future:
        return self.registry.submit(job, self.name, self.version, checked=self.holds.release(job.options))

    def precheck(self, options: InferenceOptions) -> None:
        """What admission would refuse, from the forecast the engine published after its last step or
        admission, with the requests this process let through and has not submitted yet counting in flight."""
        forecast = self.board.read() if self.board is not None else None
        now = time.monotonic()
        if forecast is not None:
            precheck_forecast(forecast, options, now, self.holds.count(now))
        self.holds.add(options, now)

    def passed(self, job: Job) -> bool:
        return job.fallback is not None

    def answer_now(self, job: Job) -> Answer:
        """The answer from the exit the engine process said the row passed, timed as of now."""
        answer = job.fallback
        if answer is None:
            forecast = self.board.read() if self.board is not None else None
            exit1_s = forecast.exit1_s if forecast is not None else 0.0
            raise unreached("no exit was reached by the deadline", job.options, exit1_s)
        return timed_at(answer, job, time.monotonic())

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None


class RemoteServedModel(Served):
    """A served version whose engine is in the engine process."""

    def __init__(self, registry: RemoteRegistry, state: ModelState) -> None:
        self.path = Path(state.path)
        manifest = read_manifest(self.path)
        metrics = registry.metrics.for_model(manifest.name, manifest.version, state.device)
        super().__init__(manifest, registry.settings, metrics)
        self.engine: RemoteEngine = RemoteEngine(registry, state, len(manifest.exits))
        self._registry = registry

    async def view(self) -> ModelView:
        return await self._registry.view(self.name, self.version)


class RemoteRegistry:
    """The request process's view of the engine process: models, readiness, and the link jobs travel on."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics, address: str, authkey: bytes, index: int) -> None:
        self.settings, self.metrics = settings, metrics
        self.address, self.authkey, self.index = address, authkey, index
        self.worker = str(index)  # the label of anytime_worker_requests_total
        self.store = Path(settings.model_store)
        self.default = settings.model_name or ""  # the engine process's, once its first state comes
        self.slots: dict[str, RemoteServedModel] = {}
        self.connected = False
        self.host_ready = False  # every request process has warmed up once
        self.warmed = False
        self._link: Link | None = None
        self._arena: Arena | None = None
        self._pending: dict[int, tuple[asyncio.Future, int | None, Job | None]] = {}
        self._outbox: list[JobRecord] = []
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = asyncio.Event()
        self._retiring: set[asyncio.Task] = set()

    # -- what the data plane asks ----------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.connected and self.host_ready

    @property
    def server_ready(self) -> bool:
        """The engine process says every request process has warmed once: true at once for a restarted one."""
        return self.available

    def served(self) -> list[RemoteServedModel]:
        return list(self.slots.values())

    def get(self, name: str | None = None, version: str | None = None) -> RemoteServedModel:
        model = self.slots.get(name or self.default)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is served" if name else "the default model is not loaded")
        if version is not None and version != model.version:
            raise ModelNotFound(f"model {model.name} serves version {model.version}, not {version!r}")
        return model

    def lease(
        self, name: str | None = None, version: str | None = None
    ) -> AbstractAsyncContextManager[RemoteServedModel]:
        """The model for one request, as the engine process serves it."""
        return held(self.get(name, version), self.metrics)

    # -- jobs --------------------------------------------------------------------------------------
    def submit(self, job: Job, name: str, version: str, checked: bool = False) -> asyncio.Future:
        """Send `job` to the engine process; its future completes when the answer comes back. `checked`: this
        process's check before decoding let it through and held its place."""
        link = self._link
        if link is None or not self.connected:
            raise ServiceError("the engine process is not reachable; retry shortly", NOT_READY)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job_id = next(self._ids)
        x = job.x.contiguous().float()
        slot = self._arena.put(x) if self._arena is not None else None
        inline = None if slot is not None else x.numpy().tobytes()
        self._pending[job_id] = (future, slot, job)
        self._outbox.append(
            JobRecord(
                job_id, name, version, slot, tuple(x.shape), inline, job.options, job.shadow, job.answer_by, checked
            )
        )
        if len(self._outbox) == 1:  # one message for every job of this turn of the event loop
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if batch and (self._link is None or not self._link.send(("infer", batch))):
            self._lost_jobs([record.id for record in batch])

    def _release(self, job_id: int) -> asyncio.Future | None:
        """A job's future, no longer pending, with its shared-memory slot freed (None if unknown)."""
        pending = self._pending.pop(job_id, None)
        if pending is None:
            return None
        future, slot, _ = pending
        if slot is not None and self._arena is not None:
            self._arena.free(slot)
        return future

    def _answers(self, items: list[Outcome]) -> None:
        """On the event loop: complete the futures of answered jobs and free their slots."""
        for item in items:
            future = self._release(item.id)
            if future is None or future.done():
                continue
            if item.answer is not None:
                future.set_result(item.answer)
            else:
                kind = KINDS.get(item.code or "", NOT_READY)
                future.set_exception(engine_error(kind, item.message or kind.code, item.retry_after_s))

    def _passed(self, items: list[Passed]) -> None:
        """On the event loop: the answers of exits rows passed, kept for an answer at the deadline."""
        for item in items:
            pending = self._pending.get(item.id)
            if pending is not None and pending[2] is not None:
                pending[2].fallback = item.answer

    def _lost_jobs(self, ids: list[int]) -> None:
        for job_id in ids:
            future = self._release(job_id)
            if future is not None and not future.done():
                future.set_exception(ServiceError("the engine process went away; retry shortly", NOT_READY))

    async def view(self, name: str, version: str) -> ModelView:
        """The engine process's description of a served version (live stage times, thresholds, brownout)."""
        if self._link is None or not self.connected:
            raise ServiceError("the engine process is not reachable; retry shortly", NOT_READY)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call_id = -next(self._ids) - 1  # negative: never a job id
        self._pending[call_id] = (future, None, None)
        self._link.send(("view", call_id, name, version))
        body = await asyncio.wait_for(future, 10)
        return ModelView.model_validate(body)

    # -- repository control: done by the engine process's registry ------------------------------------
    async def repository_index(self) -> list[dict[str, str]]:
        return await self._control("index", "")

    async def load(self, name: str) -> None:
        await self._control("load", name)

    async def unload(self, name: str) -> None:
        await self._control("unload", name)

    async def _control(self, action: str, name: str) -> Any:
        if self._link is None or not self.connected:
            raise ServiceError("the engine process is not reachable; retry shortly", NOT_READY)
        future = asyncio.get_running_loop().create_future()
        call_id = -next(self._ids) - 1  # negative: never a job id
        self._pending[call_id] = (future, None, None)
        self._link.send(("control", call_id, action, name))
        return await asyncio.wait_for(future, CONTROL_TIMEOUT_S)

    def _on_control(self, call_id: int, result: Any, code: str | None, message: str | None) -> None:
        pending = self._pending.pop(call_id, None)
        if pending is None or pending[0].done():
            return
        if code is None:
            pending[0].set_result(result)
        else:
            pending[0].set_exception(ServiceError(message or code, KINDS.get(code)))

    # -- the link ----------------------------------------------------------------------------------
    async def background(self, stop: Callable[[], bool]) -> None:
        """Keep the link up: connect, serve until it drops, fail what was in flight, reconnect."""
        self._loop = asyncio.get_running_loop()
        while not stop():
            try:
                conn = await asyncio.to_thread(Client, self.address, "AF_UNIX", authkey=self.authkey)
            except (OSError, EOFError):
                await asyncio.sleep(0.2)
                continue
            link = Link(conn)
            dropped = asyncio.Event()
            threading.Thread(target=self._read, args=(link, dropped), name="anytime-link", daemon=True).start()
            await dropped.wait()
            self.connected = self.host_ready = False
            self._link = None
            self._lost_jobs(list(self._pending))
            if not stop():
                log.warning("lost the engine process; reconnecting")
                await asyncio.sleep(0.1)

    def _read(self, link: Link, dropped: asyncio.Event) -> None:
        """Reader thread: every message from the engine process, handed to the event loop."""
        loop = self._loop
        assert loop is not None
        while True:
            message = link.recv()
            if message is None:
                break
            kind = message[0]
            if kind == "answers":
                loop.call_soon_threadsafe(self._answers, message[1])
            elif kind == "passed":
                loop.call_soon_threadsafe(self._passed, message[1])
            elif kind == "state":
                loop.call_soon_threadsafe(self._on_state, link, *message[1:])
            elif kind == "view":
                _, call_id, body, error = message
                loop.call_soon_threadsafe(self._on_view, call_id, body, error)
            elif kind == "control":
                loop.call_soon_threadsafe(self._on_control, *message[1:])
        link.close()
        loop.call_soon_threadsafe(dropped.set)

    def _on_view(self, call_id: int, body: dict[str, Any] | None, error: str | None) -> None:
        pending = self._pending.pop(call_id, None)
        if pending is None or pending[0].done():
            return
        if body is None:
            pending[0].set_exception(ModelNotFound(error or "not served"))
        else:
            pending[0].set_result(body)

    def _on_state(self, link: Link, ready: bool, models: list[ModelState], default: str) -> None:
        """The engine process's models and readiness; the first state of a link also sends our hello."""
        self.default = default
        kept: dict[str, RemoteServedModel] = {}
        for state in models:
            current = self.slots.get(state.name)
            same = current is not None and (current.version, current.engine.board_spec) == (state.version, state.board)
            kept[state.name] = current if same and current else RemoteServedModel(self, state)
        for model in self.slots.values():
            if kept.get(model.name) is not model:
                self._retiring.add(asyncio.get_running_loop().create_task(self._let_go(link, model)))
        self.slots = kept
        if self._link is not link:
            if self._arena is None:
                largest = max((m.input.channels * m.input.size**2 * 4 for m in kept.values()), default=4)
                self._arena = Arena(largest, SLOTS)
            link.send(("hello", self.index, os.getpid(), self._arena.name, self._arena.slot_bytes))
            if self.warmed:
                link.send(("ready",))
            self._link = link
            self.connected = True
        self.host_ready = ready
        self._state.set()

    async def _let_go(self, link: Link, model: RemoteServedModel) -> None:
        """A replaced version: once this process's requests on it are answered, the engine process may stop it."""
        try:
            await model.idle(self.settings.drain_timeout_s)
            link.send(("released", model.name, model.version))
            model.engine.close()
            model.metrics.released()
        finally:
            self._retiring.discard(asyncio.current_task())

    async def wait_connected(self) -> None:
        """Until the engine process has told us its models."""
        while not (self.connected and self.slots):
            self._state.clear()
            await self._state.wait()

    def report_ready(self) -> None:
        """This process has warmed its request path: tell the engine process (and again after a reconnect)."""
        self.warmed = True
        if self._link is not None:
            self._link.send(("ready",))

    async def stop(self) -> None:
        if self._link is not None:
            self._link.close()
        if self._arena is not None:
            await asyncio.sleep(0)
            self._arena.close()

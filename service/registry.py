"""The models a server serves, read from the model store on disk and kept current without a restart.

The store is the only source: no request can name a file or load code. In Triton's "poll"
model-control mode (the default) it is read every ANYTIME_MODEL_POLL_S; in "explicit" mode only at
start (every model, as Triton's `--load-model=*`) and when a request asks to load a model (from the
store, its newest or pinned version) or to unload one (its requests finish first). Each model has
a slot holding the one version it serves (the newest, or a pinned one). `refresh` compares the
slots with the store; a new complete version is loaded, verified (schema, sha256), warmed up in a
thread, and only then swapped in; the version it replaces finishes the requests it accepted (they
hold a lease) before its engine stops. A version that fails to load is logged and counted
(`anytime_model_load_failures_total`) and never replaces the one serving; it is tried again only
once its files change. Removing the serving version rolls back to the newest one left.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.artifact import MANIFEST, WEIGHTS, Artifact, ArtifactError, list_versions, load_artifact
from service.config import ServiceSettings
from service.errors import LOAD_FAILED, MODEL_CONTROL_REFUSED, MODEL_NOT_FOUND, ServiceError
from service.metrics import Metrics
from service.served import ServedModel, held

log = logging.getLogger("anytime.registry")


class ModelNotFound(ServiceError):
    """No served model (or served version) of that name; answered 404."""

    kind = MODEL_NOT_FOUND


class BudgetExceeded(RuntimeError):
    """Loading a model would exceed ANYTIME_MAX_MODELS_BYTES."""


def freeze_heap() -> None:
    """Exempt what the process holds now from the garbage collector's full collections (called once
    warm, and again after a version is retired): without it, each one walked the whole heap and
    stalled the event loop for 45-230 ms on the 2-core machine, every few seconds under load
    (docs/server.md, "Deadlines"). Frozen objects are never collected, so a retired engine (it holds
    reference cycles) is only freed by unfreezing, collecting once and freezing again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def signature(path: Path) -> tuple[float, ...]:
    """What changes when a version directory's files change (to retry a failed version only then)."""
    return tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in (path, path / MANIFEST, path / WEIGHTS))


def footprint(artifact: Artifact, max_batch: int) -> int:
    """Bytes a served model is expected to hold: its weights, plus its largest activation at
    `max_batch` twice over (a layer's input and output alive together during warm-up)."""
    weights = sum(t.numel() * t.element_size() for t in artifact.model.state_dict().values())
    largest = 0

    def track(_m: torch.nn.Module, _i: object, out: object) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel() * out.element_size())

    spec = artifact.manifest.input
    hooks = [m.register_forward_hook(track) for m in artifact.model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            artifact.model(torch.zeros(1, spec.channels, spec.size, spec.size))
    finally:
        for h in hooks:
            h.remove()
    return weights + 2 * largest * max_batch


@dataclass
class Slot:
    """One model's place in the registry: the version it serves, and what failed to load."""

    name: str
    pinned: str | None
    serving: ServedModel | None = None
    failed: dict[str, tuple[float, ...]] = field(default_factory=dict)  # version → signature when it failed
    bytes: int = 0
    error: str = ""  # why the last load failed (the repository index's reason)


class ModelRegistry:
    """Served models by name; `default` answers /classify."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics, device: torch.device) -> None:
        self.settings, self.metrics, self.device = settings, metrics, device
        self.store = Path(settings.model_store)
        self.default = settings.model_name or ""  # resolved by start_sync when unset
        self.slots: dict[str, Slot] = {}
        self._retiring: set[asyncio.Task] = set()
        self.on_change: Callable[[], object] | None = (
            None  # called after every swap (the engine process tells its request processes)
        )
        self._refresh_lock = asyncio.Lock()
        self._unloaded: set[str] = set()  # explicit mode: unloaded on request, not served again until loaded

    # -- what to serve -------------------------------------------------------------------------
    def wanted(self) -> dict[str, str | None]:
        """Model name → pinned version (None: newest), from the settings and the store."""
        pins = dict(self.settings.model_pins())
        names = list(pins) if self.settings.models else self._store_names()
        wanted = {name: pins.get(name) for name in names}
        wanted.setdefault(self.default, self.settings.model_version)
        if self.settings.model_version is not None:
            wanted[self.default] = self.settings.model_version
        return {name: pin for name, pin in wanted.items() if name not in self._unloaded}

    def _default(self) -> str:
        """ANYTIME_MODEL_NAME, else the only model ANYTIME_MODELS names or the store holds."""
        if self.settings.model_name:
            return self.settings.model_name
        names = [n for n, _ in self.settings.model_pins()] if self.settings.models else self._store_names()
        if len(names) == 1:
            return names[0]
        if not names:
            raise ArtifactError(f"the model store {self.store} holds no model (ANYTIME_MODEL_STORE)")
        raise ArtifactError(
            f"the model store {self.store} holds {len(names)} models ({', '.join(names)}): "
            "set ANYTIME_MODEL_NAME to the one /classify answers with"
        )

    def _store_names(self) -> list[str]:
        if not self.store.is_dir():
            return []
        return sorted(p.name for p in self.store.iterdir() if p.is_dir() and not p.name.startswith("."))

    def target(self, slot: Slot) -> str | None:
        """The version `slot` should serve now: its pin, else the newest complete one on disk."""
        versions = list_versions(self.store, slot.name)
        if slot.pinned is not None:
            return slot.pinned if slot.pinned in versions else None
        return versions[-1] if versions else None

    # -- loading ------------------------------------------------------------------------------
    def load_sync(self, name: str, version: str) -> ServedModel:
        """Load, verify and warm up one version (blocking: run it in a thread when serving)."""
        path = self.store / name / version
        artifact = load_artifact(path)
        m = artifact.manifest
        if (m.name, m.version) != (name, version):
            # A copied directory would answer under the manifest's name and version, not its own.
            raise ArtifactError(
                f"{path}: its manifest says {m.name}/{m.version}; a version directory must hold its own artifact"
            )
        need = footprint(artifact, self.settings.max_batch)
        budget = self.settings.max_models_bytes
        if budget:
            others = sum(s.bytes for s in self.slots.values() if s.name != name)
            if others + need > budget:
                raise BudgetExceeded(
                    f"{name}/{version} needs about {need / 2**20:.0f} MiB; {others / 2**20:.0f} MiB of "
                    f"ANYTIME_MAX_MODELS_BYTES={budget / 2**20:.0f} MiB is taken by the other models"
                )
        served = ServedModel.start(artifact, self.device, self.metrics, self.settings)
        served.bytes = need + served.engine.runner.graph_bytes
        if budget and others + served.bytes > budget:
            served.stop(0)
            raise BudgetExceeded(
                f"{name}/{version} holds {served.bytes / 2**20:.0f} MiB with its CUDA graphs; "
                f"{others / 2**20:.0f} MiB of ANYTIME_MAX_MODELS_BYTES={budget / 2**20:.0f} MiB is taken by the others"
            )
        return served

    def _failed(self, slot: Slot, version: str, exc: Exception) -> None:
        slot.failed[version] = signature(self.store / slot.name / version)
        slot.error = f"version {version}: {exc}"
        self.metrics.load_failures.labels(model=slot.name).inc()
        log.error("model %s version %s not served: %s", slot.name, version, exc)

    def _install(self, slot: Slot, served: ServedModel) -> None:
        """Swap `served` in (one assignment on the event loop) and retire what it replaces."""
        old, slot.serving, slot.bytes = slot.serving, served, served.bytes
        log.info("serving %s version %s%s", slot.name, served.version, f" (was {old.version})" if old else "")
        if self.on_change is not None:
            self.on_change()
        if old is not None:
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: ServedModel) -> None:
        """Let the requests that hold the old version finish, then stop its engine."""
        await old.idle(self.settings.drain_timeout_s)
        await asyncio.to_thread(old.stop, self.settings.drain_timeout_s)
        name, version = old.name, old.version
        del old
        if gc.get_freeze_count():  # frozen once warm: the old engine is in the frozen heap
            freeze_heap()
        log.info("released %s version %s", name, version)

    def start_sync(self) -> None:
        """At start-up: load every wanted model; the default one must load (its error is raised)."""
        self.default = self._default()
        for name, pinned in self.wanted().items():
            slot = self.slots.setdefault(name, Slot(name, pinned))
            version = self.target(slot)
            if version is None:
                if name == self.default:
                    raise ArtifactError(self._missing(name, pinned))
                log.error("model %s not served: %s", name, self._missing(name, pinned))
                continue
            try:
                slot.serving = self.load_sync(name, version)
                slot.bytes = slot.serving.bytes
            except (ArtifactError, BudgetExceeded) as exc:
                if name == self.default:
                    raise
                self._failed(slot, version, exc)

    def _missing(self, name: str, pinned: str | None) -> str:
        known = ", ".join(list_versions(self.store, name)) or "none"
        what = f"{name}/{pinned}" if pinned else f"named {name!r}"
        return f"No artifact {what} in model store {self.store}; versions: {known}"

    async def refresh(self) -> None:
        """Bring every slot to its target version (new models, new versions, pins, roll-backs)."""
        async with self._refresh_lock:
            for name, pinned in self.wanted().items():
                slot = self.slots.setdefault(name, Slot(name, pinned))
                version = self.target(slot)
                if version is None or (slot.serving is not None and slot.serving.version == version):
                    if version is None and slot.serving is not None:
                        log.warning("no version of %s left on disk; still serving %s", name, slot.serving.version)
                    continue
                if slot.failed.get(version) == signature(self.store / name / version):
                    continue  # failed before and unchanged since
                try:
                    served = await asyncio.to_thread(self.load_sync, name, version)
                except (ArtifactError, BudgetExceeded) as exc:
                    self._failed(slot, version, exc)
                    continue
                slot.failed.pop(version, None)
                self._install(slot, served)

    # -- explicit model control (Triton's repository extension) --------------------------------
    async def repository_index(self) -> list[dict[str, str]]:
        """Every model of the store and every one served: the version served (else the newest on disk),
        READY or UNAVAILABLE, and why not (Triton's repository index)."""
        entries = []
        for name in sorted(set(self._store_names()) | set(self.slots)):
            slot = self.slots.get(name)
            if slot is not None and slot.serving is not None:
                entries.append({"name": name, "version": slot.serving.version, "state": "READY", "reason": ""})
                continue
            versions = list_versions(self.store, name)
            reason = "unloaded" if name in self._unloaded else (slot.error if slot and slot.error else "not loaded")
            version = versions[-1] if versions else ""
            entries.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason})
        return entries

    async def load(self, name: str) -> None:
        """Serve `name` from the store at its newest (or pinned) version, replacing the version serving when
        there is a newer one; a load that fails raises `load_failed` and leaves the version serving."""
        self._control_allowed()
        async with self._refresh_lock:
            slot = self.slots.get(name) or Slot(name, dict(self.settings.model_pins()).get(name))
            version = self.target(slot)
            if version is None:
                if name not in self._store_names():
                    raise ModelNotFound(f"the model store holds no model named {name!r}")
                raise ServiceError(f"{name} failed to load: {self._missing(name, slot.pinned)}", LOAD_FAILED)
            if slot.serving is None or slot.serving.version != version:
                try:
                    served = await asyncio.to_thread(self.load_sync, name, version)
                except (ArtifactError, BudgetExceeded) as exc:
                    self._failed(slot, version, exc)
                    self.slots.setdefault(name, slot)
                    kept = f"; still serving version {slot.serving.version}" if slot.serving else ""
                    raise ServiceError(f"{name}/{version} failed to load: {exc}{kept}", LOAD_FAILED) from None
                slot.failed.pop(version, None)
                slot.error = ""
                self.slots[name] = slot
                self._install(slot, served)
            self._unloaded.discard(name)

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests for it get 404, those it accepted are answered first. The
        default model stays (/classify answers with it)."""
        self._control_allowed()
        if name == self.default:
            raise ServiceError(
                f"{name} is the default model (what /classify answers with) and stays loaded; "
                "serve another as the default (ANYTIME_MODEL_NAME) to unload it",
                MODEL_CONTROL_REFUSED,
            )
        async with self._refresh_lock:
            slot = self.slots.get(name)
            if slot is None and name not in self._store_names():
                raise ModelNotFound(f"no model named {name!r} is served or in the store")
            self._unloaded.add(name)
            old = slot.serving if slot is not None else None
            if slot is None or old is None:
                return
            slot.serving, slot.bytes = None, 0
            log.info("unloaded %s version %s", name, old.version)
            if self.on_change is not None:
                self.on_change()
        await self._retire(old)

    def _control_allowed(self) -> None:
        if self.settings.model_control != "explicit":
            raise ServiceError(
                "loading and unloading on request needs ANYTIME_MODEL_CONTROL=explicit; this server reads its "
                "model store every ANYTIME_MODEL_POLL_S seconds",
                MODEL_CONTROL_REFUSED,
            )

    # -- what the app's lifespan asks of a registry (service/workers/remote.py has the other kind) --
    available = True  # the models are here, in this process
    server_ready = False  # one process: its own readiness is the server's
    worker: str | None = None  # the request process's label (several request processes only)

    async def background(self, stop: Callable[[], bool]) -> None:
        """Watch the store (every ANYTIME_MODEL_POLL_S seconds; never when 0, or in explicit mode) until `stop()`."""
        if self.settings.model_poll_s > 0 and self.settings.model_control == "poll":
            await self.watch(self.settings.model_poll_s, stop)

    async def wait_connected(self) -> None:
        """The models are loaded before the app starts: nothing to wait for."""

    def report_ready(self) -> None:
        """Nobody else needs to know."""

    async def watch(self, interval_s: float, stop: Callable[[], bool]) -> None:
        """Refresh every `interval_s` seconds until `stop()` is true; errors are logged, never fatal."""
        while not stop():
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("refreshing the model store failed")

    async def stop(self) -> None:
        """Drain and stop every engine (SIGTERM)."""
        for task in list(self._retiring):
            await task
        for slot in self.slots.values():
            if slot.serving is not None:
                await asyncio.to_thread(slot.serving.stop, self.settings.drain_timeout_s)

    # -- lookups ------------------------------------------------------------------------------
    def served(self) -> list[ServedModel]:
        return [s.serving for s in self.slots.values() if s.serving is not None]

    def get(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The serving version of `name` (the default model when None); `version` must be it."""
        slot = self.slots.get(name or self.default)
        if slot is None or slot.serving is None:
            raise ModelNotFound(f"no model named {name!r} is served" if name else "the default model is not loaded")
        if version is not None and version != slot.serving.version:
            raise ModelNotFound(f"model {slot.name} serves version {slot.serving.version}, not {version!r}")
        return slot.serving

    def lease(self, name: str | None = None, version: str | None = None) -> AbstractAsyncContextManager[ServedModel]:
        """The model for one request: a swap waits for the request to finish before stopping it."""
        return held(self.get(name, version), self.metrics)

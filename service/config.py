"""The server's settings: one class, filled from ANYTIME_* environment variables (docs/server.md lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Settings of `anytime-serve`."""

    model_config = SettingsConfigDict(env_prefix="ANYTIME_", extra="ignore", protected_namespaces=())

    model_store: Path = Field(Path("model_store"), description="directory of artifacts <name>/<version>/")
    model_name: str | None = Field(
        None,
        description="the default model: what /classify answers with; unset: the one model ANYTIME_MODELS names "
        "or the store holds (an error naming them when there are several)",
    )
    model_version: str | None = Field(None, description="pinned version of the default model; newest when unset")
    models: str | None = Field(
        None,
        description="models to serve, comma-separated, each `name` (newest) or `name:version` (pinned); "
        "default: every model in the store",
    )
    model_poll_s: float = Field(10.0, ge=0, description="how often the store is checked for new versions; 0: never")
    model_control: Literal["poll", "explicit"] = Field(
        "poll",
        description="poll: the store is read every ANYTIME_MODEL_POLL_S; explicit: only at start and when "
        "asked to load or unload (Triton's --model-control-mode)",
    )
    max_models_bytes: int = Field(
        0, ge=0, description="memory budget of all served models (weights + warm-up estimate); 0: no limit"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 only inside a container")
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="Open Inference Protocol over gRPC; 0: off")
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="request processes in front of one engine process; 0: 1 on CPU, half the cores (2 to 8) on CUDA",
    )
    max_batch: int = Field(32, ge=1, le=1024, description="most requests run through the stages together")
    # 0: batches form from what queued up while the worker was busy; waiting 2 ms to fill a batch
    # raised single-client p50 from 5.7 to 7.8 ms in `make bench` without a reliable throughput gain.
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long the worker waits to fill a batch")
    queue_size: int = Field(256, ge=1, description="rows waiting in the stage queues beyond this: new requests get 503")
    aging_ms: float = Field(
        20.0,
        gt=0,
        description="a request without a deadline is scheduled as if due this long after it arrived "
        "(earliest deadline first, without starving it); also how long rows may wait to merge into fuller batches",
    )
    priority_levels: int = Field(
        2, ge=1, le=16, description="a request's `priority` is 1 (the highest) to this (Triton's priority_levels)"
    )
    default_priority: int = Field(2, ge=1, description="the level of a request that names none (or 0)")
    priority_step_ms: float = Field(
        10.0,
        ge=0,
        description="each level below the highest counts as this much less urgent in the queues (deadlines stay)",
    )
    cuda_graphs: bool = Field(True, description="on CUDA, replay each stage as a CUDA graph (false: eager kernels)")
    overload: Literal["shed", "degrade"] = Field(
        "shed", description="shed: refuse what cannot make its deadline; degrade: answer from earlier exits first"
    )
    brownout_floor_pp: float = Field(
        2.0,
        ge=0,
        description="degrade never below the shallowest exit within this many points of the final "
        "exit's validation accuracy",
    )
    resend_hold_ms: float = Field(
        200.0,
        ge=0,
        le=10_000,
        description="a connection that sends a refused request again at once, twice in a row, gets its next refusal "
        "without an admission attempt, held about this long (0.5-1.5x, drawn per hold); 0: off",
    )
    resend_at_once_ms: float = Field(
        5.0,
        gt=0,
        le=1000,
        description="the same request this soon after its refusal on its connection was resent at once",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies are answered 413")
    max_image_pixels: int = Field(16_000_000, ge=1, description="larger images are answered 413")
    # A 28x28 PNG decodes in about 0.1 ms, less than the hop to a thread and back; a photo takes
    # milliseconds, which would stall every other request on the event loop.
    inline_decode_pixels: int = Field(
        65_536, ge=0, description="images of at most this many pixels are decoded on the event loop"
    )
    max_files: int = Field(64, ge=1, description="most images in one /classify/batch request")
    default_deadline_ms: float | None = Field(None, gt=0, description="deadline for requests that name none")
    request_timeout_s: float = Field(
        30.0, gt=0, description="cap of every request's deadline (and the deadline of requests without one)"
    )
    # One intra-op thread by default: on a shared CPU, multi-threaded kernels wait for each other's
    # descheduled threads (bundled model, batch 1: 0.57 ms per stage on 1 thread, 160 ms on 2 while
    # another process kept both cores busy). Raise it for large models on a machine of their own.
    torch_threads: int = Field(1, ge=1, description="torch.set_num_threads for the server process")
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="on a CPU, how many nice steps below the event loops the engine's worker runs, so that "
        "the loop refuses first under overload; in one process a second worker thread at the loop's "
        "priority takes the steps while other processes of the server's scheduling group keep its cores "
        "busy; 0: one worker thread at the loop's priority (docs/server.md)",
    )
    keep_warm_ms: float | None = Field(
        None,
        ge=0,
        description="on a CPU, while requests come in (up to 30 s after the last), an idle worker runs stage 1 "
        "on a blank input this often, so that the next request finds the model in the core's caches; "
        "0: never; unset: 10 with one request process, 0 with several (docs/server.md)",
    )
    # A balancer checking /readyz every 1 s, down after 2 failures, stops sending within 3 s.
    drain_grace_s: float = Field(
        3.0,
        ge=0,
        description="on SIGTERM, how long the server keeps answering while /readyz says 503 "
        "(so load balancers stop sending) before it closes its listener",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="after the grace period, how long requests already read may take to finish"
    )
    warmup: bool = Field(True, description="run warm-up batches before /readyz turns ready")
    shadow_rate: float = Field(
        0.01, ge=0, le=1, description="share of early answers also run to the final exit, when the worker is idle"
    )
    shadow_queue: int = Field(64, ge=1, description="shadow checks waiting beyond this are dropped (and counted)")
    adapt: bool = Field(False, description="let the drift guard raise (and lower back) exit thresholds")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _default_level(self) -> ServiceSettings:
        if self.default_priority > self.priority_levels:
            raise ValueError(
                f"default_priority {self.default_priority} is above priority_levels {self.priority_levels}"
            )
        return self

    def model_pins(self) -> list[tuple[str, str | None]]:
        """ANYTIME_MODELS as (name, pinned version or None) pairs, in order."""
        pairs = []
        for item in (self.models or "").split(","):
            name, _, version = item.strip().partition(":")
            if name:
                pairs.append((name, version or None))
        return pairs

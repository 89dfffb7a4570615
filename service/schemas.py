"""Bodies of the HTTP API (its request options are `service/options.py`'s `OptionFields`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from models.artifact import Ensemble, ExitInfo, InputSpec, PolicyChoice
from service.options import OptionFields


class ClassifyJSON(OptionFields):
    """JSON body of /classify: a base64 image and the options."""

    image: str = Field(..., description="base64-encoded image bytes", max_length=64 * 1024 * 1024)


class TopK(BaseModel):
    label: str
    index: int
    probability: float


class Classification(BaseModel):
    """One image's answer."""

    label: str
    index: int
    confidence: float = Field(description="calibrated confidence at the exit that answered")
    exit: int = Field(description="the exit that answered, 1-based")
    exits: int = Field(description="number of exits of the model")
    reason: Literal["confidence", "deadline", "max_exit", "final"]
    top_k: list[TopK] = Field(description="the top classes: `top_k` of them, or every class when the model has fewer")
    latency_ms: float = Field(description="server-side time from receipt to answer")
    queue_ms: float = Field(description="time spent waiting for the worker")
    model: str
    version: str
    probabilities: list[float] | None = Field(
        None, description="every class's calibrated probability at the exit that answered (option `probabilities`)"
    )


class BatchClassification(BaseModel):
    results: list[Classification]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelView(BaseModel):
    """GET /v1/model: the served artifact's manifest without training internals, plus live stage times."""

    name: str
    version: str
    created: str | None
    architecture: str = Field(description="registered network name")
    dataset: str | None
    classes: list[str]
    input: InputSpec
    exits: list[ExitInfo]
    ensemble: Ensemble | None
    policy: PolicyChoice = Field(description="how the thresholds were chosen and what they give (no sweep)")
    device: str
    stage_ms_now: list[dict[str, float]] = Field(description="per stage: current estimate (ms) by batch size")
    admission_slowdown: float = Field(
        description="how many times longer than the stage times predict admitted jobs wait for exit 1 (1: as predicted)"
    )
    in_flight_limit: float = Field(
        description="how many admitted requests may wait for exit 1 at once, learnt from which made their deadline"
    )
    thresholds_in_force: list[float] = Field(description="per exit: the artifact's, or the drift guard's when adapting")
    shadow_agreement: list[float | None] = Field(
        description="per exit: agreement with the final exit in the drift guard's current window"
    )
    brownout: Brownout


class Brownout(BaseModel):
    """The overload mode and the deepest exit new work may reach now."""

    mode: Literal["shed", "degrade"]
    level: int = Field(description="exits taken off the end (0: none)")
    max_exit_in_force: int
    floor_exit: int = Field(description="the brownout never goes below this exit")


class ServedSummary(BaseModel):
    """One served model in GET /v1/models."""

    name: str
    version: str = Field(description="the version serving now")
    versions: list[str] = Field(description="complete versions in the model store, oldest first")
    default: bool = Field(description="whether /classify answers with it")
    device: str
    exits: int
    classes: int


class ModelList(BaseModel):
    """GET /v1/models."""

    default: str
    models: list[ServedSummary]

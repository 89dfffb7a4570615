"""Request options and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.artifact import Ensemble, ExitInfo, InputSpec, PolicyChoice


class ClassifyOptions(BaseModel):
    """Options of /classify, from the query string, the JSON body or the X-Deadline-Ms header."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="overrides every exit's")
    deadline_ms: float | None = Field(None, gt=0, le=3_600_000, allow_inf_nan=False, description="latency budget")
    top_k: int = Field(1, ge=1, le=1000, description="how many classes to return")
    max_exit: int | None = Field(None, ge=1, description="answer at this exit at the latest (1-based)")


class ClassifyJSON(ClassifyOptions):
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
    top_k: list[TopK]
    latency_ms: float = Field(description="server-side time from receipt to answer")
    queue_ms: float = Field(description="time spent waiting for the worker")
    model: str
    version: str


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
    thresholds_in_force: list[float] = Field(description="per exit: the artifact's, or the drift guard's when adapting")
    shadow_agreement: list[float | None] = Field(
        description="per exit: agreement with the final exit in the drift guard's current window"
    )


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

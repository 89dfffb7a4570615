"""Request options, written once: one type every protocol builds, one set of bounds, one budget rule.

A protocol adapter maps its wire fields (query string, JSON body, X-Deadline-Ms, v2 parameters,
the gRPC deadline) to `OptionFields` and a list of budgets, and calls `inference_options`.

The budget rule: every latency budget a request gives (`deadline_ms` in the query or JSON body,
X-Deadline-Ms, the v2 `timeout` in microseconds and `deadline_ms` parameters, the gRPC deadline)
is a deadline counted from when the request arrived, and **the earliest deadline wins**. A request
that gives none gets ANYTIME_DEFAULT_DEADLINE_MS when it is set. ANYTIME_REQUEST_TIMEOUT_S caps
every deadline: a larger budget is cut to it, and a request without any deadline gets it, so the
engine keeps one clock for every request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from service.errors import INVALID_OPTION, ServiceError


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_no_bool)]
Integer = Annotated[int, BeforeValidator(_no_bool)]  # 2, "2" and 2.0 pass; 2.7 and "2.7" are refused


class OptionFields(BaseModel):
    """The options of an inference request, with their bounds (the same for every protocol)."""

    model_config = ConfigDict(extra="forbid")

    threshold: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="overrides every exit's")
    deadline_ms: Number | None = Field(None, gt=0, allow_inf_nan=False, description="latency budget (ms)")
    top_k: Integer = Field(1, ge=1, le=1000, description="how many classes to return (clamped to the class count)")
    max_exit: Integer | None = Field(None, ge=1, description="answer at this exit at the latest (1-based)")
    probabilities: bool = Field(False, description="also return every class's calibrated probability")
    priority: Integer | None = Field(
        None, ge=0, description="priority level, 1 the highest (Triton's schedule policy); 0 or none: the default"
    )


NO_OPTIONS = OptionFields()
_BUDGET: TypeAdapter[float] = TypeAdapter(Annotated[Number, Field(gt=0, allow_inf_nan=False)])


def validation_message(exc: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """Pydantic's errors as one sentence naming each bad option (`names` renames fields for the wire)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        where = (names or {}).get(where, where)
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where or 'request'}: {message}")
    return "; ".join(parts) or "invalid request"


def option_fields(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> OptionFields:
    """Validate raw option values (strings from a query, JSON values, gRPC parameters); 422 invalid_option."""
    if not values:
        return NO_OPTIONS
    try:
        return OptionFields.model_validate(values)
    except ValidationError as exc:
        raise ServiceError(validation_message(exc, names), INVALID_OPTION) from None


def budget_ms(name: str, value: Any, scale: float = 1.0) -> float | None:
    """A latency budget given as `value` (× `scale` to milliseconds); None when absent. Must be a
    finite number > 0."""
    if value is None:
        return None
    try:
        return _BUDGET.validate_python(value) * scale
    except ValidationError as exc:
        raise ServiceError(validation_message(exc, {"": name}), INVALID_OPTION) from None


@dataclass(frozen=True, slots=True)
class InferenceOptions:
    """One inference request's options, whatever protocol it came by.

    `deadline` is absolute, on the `time.monotonic()` clock; `client_deadline` says whether the
    client (or ANYTIME_DEFAULT_DEADLINE_MS) set it rather than the server's cap.
    """

    received: float
    deadline: float
    client_deadline: bool = False
    threshold: float | None = None
    max_exit: int | None = None
    top_k: int = 1
    probabilities: bool = False
    priority: int = 0  # the level, 1 the highest (0: none given, as the default level of in-process callers)

    @property
    def budget_ms(self) -> float:
        return (self.deadline - self.received) * 1e3

    @classmethod
    def now(cls, deadline_ms: float | None = None, cap_s: float = 30.0, **fields: Any) -> InferenceOptions:
        """Options of a request arriving now (in-process callers: benchmarks, tests)."""
        received = time.monotonic()
        deadline, client = resolve_deadline(received, [deadline_ms], None, cap_s)
        return cls(received=received, deadline=deadline, client_deadline=client, **fields)


def resolve_deadline(
    received: float, budgets: Sequence[float | None], default_ms: float | None, cap_s: float
) -> tuple[float, bool]:
    """The deadline of a request that arrived at `received`: the earliest of its budgets (ms), else
    `default_ms`, each capped at `cap_s`; the cap alone when neither exists. Also whether a budget set it."""
    given = [b for b in budgets if b is not None]
    budget = min(given) if given else default_ms
    cap_ms = cap_s * 1e3
    if budget is None or not math.isfinite(budget):
        return received + cap_s, False
    return received + min(budget, cap_ms) / 1e3, True


def inference_options(
    received: float,
    fields: OptionFields,
    budgets: Sequence[float | None],
    default_deadline_ms: float | None,
    cap_s: float,
    probabilities: bool = False,
    priority_levels: int = 1,
    default_priority: int = 1,
) -> InferenceOptions:
    """The one request type, from validated fields and every budget the request gave; a priority of 0 or
    none is `default_priority`, one above `priority_levels` is refused."""
    deadline, client = resolve_deadline(received, [fields.deadline_ms, *budgets], default_deadline_ms, cap_s)
    if fields.priority is not None and fields.priority > priority_levels:
        raise ServiceError(
            f"priority: {fields.priority} is not a level of this server (1, the highest, to {priority_levels})",
            INVALID_OPTION,
        )
    return InferenceOptions(
        received=received,
        deadline=deadline,
        client_deadline=client,
        threshold=fields.threshold,
        max_exit=fields.max_exit,
        top_k=fields.top_k,
        probabilities=probabilities or fields.probabilities,
        priority=fields.priority or default_priority,
    )

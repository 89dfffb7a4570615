"""The one error table: every failure the server answers with, and what each protocol makes of it.

Each `Kind` maps once to an HTTP status (what `/classify` answers), a gRPC status code name and
a stable `code` string that every protocol carries. The Open Inference Protocol over REST answers
every bad request with 400, as the protocol says (`v2_status`). Protocol modules only render:
`/classify` as `{"error": {"code", "message"}}`, v2 REST as `{"error": message, "code": code}`,
gRPC as the status with the message. `to_error` turns any exception into a `ServiceError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException


@dataclass(frozen=True)
class Kind:
    """One row of the error table."""

    code: str
    status: int
    grpc: str  # a grpc.StatusCode name (this module imports no transport)
    retry_after_s: int | None = None


INVALID_OPTION = Kind("invalid_option", 422, "INVALID_ARGUMENT")
INVALID_REQUEST = Kind("invalid_request", 400, "INVALID_ARGUMENT")
INVALID_JSON = Kind("invalid_json", 400, "INVALID_ARGUMENT")
INVALID_BASE64 = Kind("invalid_base64", 400, "INVALID_ARGUMENT")
MISSING_FILE = Kind("missing_file", 422, "INVALID_ARGUMENT")
EMPTY_IMAGE = Kind("empty_image", 400, "INVALID_ARGUMENT")
UNDECODABLE_IMAGE = Kind("undecodable_image", 400, "INVALID_ARGUMENT")
UNSUPPORTED_MEDIA_TYPE = Kind("unsupported_media_type", 415, "INVALID_ARGUMENT")
UNSUPPORTED_IMAGE_FORMAT = Kind("unsupported_image_format", 415, "INVALID_ARGUMENT")
BODY_TOO_LARGE = Kind("body_too_large", 413, "RESOURCE_EXHAUSTED")
IMAGE_TOO_LARGE = Kind("image_too_large", 413, "RESOURCE_EXHAUSTED")
TOO_MANY_ITEMS = Kind("too_many_items", 413, "RESOURCE_EXHAUSTED")
MODEL_NOT_FOUND = Kind("model_not_found", 404, "NOT_FOUND")
NOT_FOUND = Kind("not_found", 404, "NOT_FOUND")
METHOD_NOT_ALLOWED = Kind("method_not_allowed", 405, "UNIMPLEMENTED")
OVERLOADED = Kind("overloaded", 503, "RESOURCE_EXHAUSTED", retry_after_s=1)
NOT_READY = Kind("not_ready", 503, "UNAVAILABLE", retry_after_s=1)
SHUTTING_DOWN = Kind("shutting_down", 503, "UNAVAILABLE", retry_after_s=5)
DEADLINE_EXCEEDED = Kind("deadline_exceeded", 504, "DEADLINE_EXCEEDED")
INFERENCE_FAILED = Kind("inference_failed", 500, "INTERNAL")
INTERNAL_ERROR = Kind("internal_error", 500, "INTERNAL")
BAD_REQUEST = Kind("bad_request", 400, "INVALID_ARGUMENT")
MODEL_CONTROL_REFUSED = Kind("model_control_refused", 409, "FAILED_PRECONDITION")
LOAD_FAILED = Kind("load_failed", 400, "INVALID_ARGUMENT")

TABLE: tuple[Kind, ...] = tuple(k for k in globals().values() if isinstance(k, Kind))
_BY_STATUS = {
    400: BAD_REQUEST,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    413: BODY_TOO_LARGE,
    415: UNSUPPORTED_MEDIA_TYPE,
}


class ServiceError(Exception):
    """A failure answered to the client: its `kind` (the table row) and a sentence saying what was wrong.

    `retry_after_s` overrides the kind's Retry-After (e.g. a predicted wait); `headers` are extra
    HTTP headers (Starlette's `Allow` on a 405).
    """

    kind: Kind = INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        kind: Kind | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        self.retry_after_s = retry_after_s if retry_after_s is not None else self.kind.retry_after_s
        self.extra_headers = headers or {}

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def status(self) -> int:
        return self.kind.status

    def headers(self) -> dict[str, str]:
        """HTTP headers of the answer: Retry-After (whole seconds, at least 1) and any extra ones."""
        headers = dict(self.extra_headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return headers


def v2_status(kind: Kind) -> int:
    """The HTTP status of the Open Inference Protocol over REST: 400 for every bad request."""
    return 400 if kind.status in (400, 415, 422) else kind.status


def to_error(exc: BaseException) -> ServiceError | None:
    """The ServiceError an exception stands for; None for an unexpected one (a bug: answered 500 and logged).

    A ServiceError comes back without its traceback: it is an answer, not a fault, and its traceback
    holds the frames it was raised through, one of which holds the error itself (admission raises the
    refusal it built). Kept, every refusal would be a reference cycle that only the cycle collector
    frees, and under overload its passes stalled the event loop for up to 4 ms several times a second
    (docs/server.md, "Refusals leave no garbage")."""
    if isinstance(exc, ServiceError):
        return exc.with_traceback(None)
    if isinstance(exc, HTTPException):  # Starlette's own, e.g. its multipart parser's 400 "Too many fields"
        kind = _BY_STATUS.get(exc.status_code, BAD_REQUEST)
        return ServiceError(str(exc.detail), kind, headers=dict(exc.headers or {}))  # keeps Allow on a 405
    return None


def internal_error() -> ServiceError:
    return ServiceError("the server failed to process the request", INTERNAL_ERROR)

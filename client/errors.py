"""Typed errors of the client, one per way a request can fail."""

from __future__ import annotations


class AnytimeError(Exception):
    """A request failed; `status` is the HTTP status (None when no answer came), `code` the server's
    code, `attempts` how many times it was sent (retries included)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code
        self.attempts = 1


class Unreachable(AnytimeError):
    """No answer: the connection was refused, or closed before the answer came."""


class BadInput(AnytimeError):
    """4xx: the image or an option was rejected; sending it again will not help."""


class Overloaded(AnytimeError):
    """503: the server is full or not ready; retry after `retry_after` seconds."""

    def __init__(
        self, message: str, status: int | None = 503, code: str | None = None, retry_after: float | None = None
    ):
        super().__init__(message, status, code)
        self.retry_after = retry_after


class DeadlineExceeded(AnytimeError):
    """504, or no answer within the deadline plus the client's margin."""


class ServerError(AnytimeError):
    """5xx other than 503 and 504, or an answer that is not the documented JSON."""

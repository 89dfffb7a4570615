"""`AnytimeClient` (sync) and `AsyncAnytimeClient`: send an image with a deadline, get a typed answer.

The client sends the deadline as `X-Deadline-Ms` and gives up itself at the deadline plus a
margin (network and decoding), so a caller never waits much longer than the budget it set.
Classification is idempotent, so a request that found no server (connection refused or closed
before the answer) or a 503 with `Retry-After` is sent again, at most `retries` times and only
while the wait still fits in the deadline (or `timeout_s` without one); each retry carries the
budget that is left.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from client.errors import AnytimeError, BadInput, DeadlineExceeded, Overloaded, ServerError, Unreachable
from client.result import Result

ImageInput = str | Path | bytes | Any  # Any: an object with PIL's `save(fp, format=...)`
_MAGIC = [
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
]


def image_bytes(image: ImageInput) -> tuple[bytes, str]:
    """The bytes and content type to send for a path, raw bytes, or a PIL image."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"image must be a path, bytes or a PIL image, not {type(image).__name__}")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "image/webp"
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return data, ctype
    return data, "application/octet-stream"


def raise_for_answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 200; otherwise the typed error the status stands for."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict):
        return body
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = err.get("message") or f"HTTP {response.status_code}"
    code, status = err.get("code"), response.status_code
    if status == 503:
        retry = response.headers.get("retry-after")
        raise Overloaded(message, status, code, float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
    if status == 504:
        raise DeadlineExceeded(message, status, code)
    if 400 <= status < 500:
        raise BadInput(message, status, code)
    raise ServerError(message, status, code)


class _Attempts:
    """The budget of one classification across its attempts, and the retry decision."""

    def __init__(self, deadline_ms: float | None, timeout_s: float, retries: int, backoff_ms: float) -> None:
        self.deadline_ms, self.timeout_s = deadline_ms, timeout_s
        self.retries, self.backoff_ms = retries, backoff_ms
        self.start = time.perf_counter()
        self.count = 0

    def remaining_s(self) -> float:
        budget = self.deadline_ms / 1e3 if self.deadline_ms is not None else self.timeout_s
        return budget - (time.perf_counter() - self.start)

    def pause_s(self, error: AnytimeError) -> float | None:
        """How long to wait before sending again, or None to give up (and raise `error`)."""
        error.attempts = self.count
        if self.count > self.retries:
            return None
        if isinstance(error, Overloaded) and error.retry_after is not None:
            # Clients refused together would all come back together: spread them over a quarter more.
            wait = error.retry_after * random.uniform(1.0, 1.25)
        elif isinstance(error, Unreachable):  # exponential backoff (at most 1 s) with jitter, so retries spread
            wait = min(self.backoff_ms / 1e3 * 2 ** (self.count - 1), 1.0) * random.uniform(0.5, 1.0)
        else:
            return None
        return wait if wait < self.remaining_s() else None


class _Base:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        deadline_ms: float | None = None,
        timeout_margin_ms: float = 250.0,
        timeout_s: float = 30.0,
        retries: int = 2,
        retry_backoff_ms: float = 50.0,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.deadline_ms, self.margin_ms, self.timeout_s = deadline_ms, timeout_margin_ms, timeout_s
        self.retries, self.retry_backoff_ms = retries, retry_backoff_ms

    def _attempts(self, deadline_ms: float | None) -> _Attempts:
        deadline = deadline_ms if deadline_ms is not None else self.deadline_ms
        return _Attempts(deadline, self.timeout_s, self.retries, self.retry_backoff_ms)

    def _request(
        self,
        image: ImageInput,
        attempts: _Attempts,
        threshold: float | None,
        max_exit: int | None,
        top_k: int | None,
    ) -> dict[str, Any]:
        """The keyword arguments of one POST /classify, with the budget that is left."""
        data, ctype = image_bytes(image)
        headers = {"content-type": ctype}
        timeout = self.timeout_s
        if attempts.deadline_ms is not None:
            left_ms = attempts.remaining_s() * 1e3
            headers["x-deadline-ms"] = f"{max(left_ms, 0.001):.3f}"
            timeout = (left_ms + self.margin_ms) / 1e3
        params = {
            k: v for k, v in (("threshold", threshold), ("max_exit", max_exit), ("top_k", top_k)) if v is not None
        }
        return {"content": data, "headers": headers, "params": params, "timeout": timeout}

    @contextmanager
    def _transport_errors(self, timeout_s: float) -> Iterator[None]:
        """Turn httpx's transport failures into the client's typed errors."""
        try:
            yield
        except httpx.TimeoutException:
            raise DeadlineExceeded(f"no answer within {timeout_s * 1e3:.0f} ms") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise Unreachable(f"no answer from {self.base_url}: {exc}") from None
        except httpx.TransportError as exc:
            raise AnytimeError(f"cannot reach {self.base_url}: {exc}") from None


class AnytimeClient(_Base):
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        deadline_ms: float | None = None,
        timeout_margin_ms: float = 250.0,
        timeout_s: float = 30.0,
        retries: int = 2,
        retry_backoff_ms: float = 50.0,
    ) -> None:
        super().__init__(base_url, deadline_ms, timeout_margin_ms, timeout_s, retries, retry_backoff_ms)
        self._http = httpx.Client(base_url=self.base_url)

    def classify(
        self,
        image: ImageInput,
        deadline_ms: float | None = None,
        threshold: float | None = None,
        max_exit: int | None = None,
        top_k: int | None = None,
    ) -> Result:
        """Classify one image; raises BadInput, Overloaded, DeadlineExceeded, Unreachable or ServerError."""
        attempts = self._attempts(deadline_ms)
        while True:
            attempts.count += 1
            kwargs = self._request(image, attempts, threshold, max_exit, top_k)
            try:
                with self._transport_errors(kwargs["timeout"]):
                    response = self._http.post("/classify", **kwargs)
                body = raise_for_answer(response)
                return Result.from_json(body, (time.perf_counter() - attempts.start) * 1e3, attempts.count)
            except AnytimeError as exc:
                pause = attempts.pause_s(exc)
                if pause is None:
                    raise
                time.sleep(pause)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AnytimeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAnytimeClient(_Base):
    """asyncio client. Use with `async with`, or `await aclose()`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        deadline_ms: float | None = None,
        timeout_margin_ms: float = 250.0,
        timeout_s: float = 30.0,
        retries: int = 2,
        retry_backoff_ms: float = 50.0,
        max_connections: int = 100,
    ) -> None:
        super().__init__(base_url, deadline_ms, timeout_margin_ms, timeout_s, retries, retry_backoff_ms)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, limits=limits)

    async def classify(
        self,
        image: ImageInput,
        deadline_ms: float | None = None,
        threshold: float | None = None,
        max_exit: int | None = None,
        top_k: int | None = None,
    ) -> Result:
        """Classify one image; raises BadInput, Overloaded, DeadlineExceeded, Unreachable or ServerError."""
        attempts = self._attempts(deadline_ms)
        while True:
            attempts.count += 1
            kwargs = self._request(image, attempts, threshold, max_exit, top_k)
            try:
                with self._transport_errors(kwargs["timeout"]):
                    response = await self._http.post("/classify", **kwargs)
                body = raise_for_answer(response)
                return Result.from_json(body, (time.perf_counter() - attempts.start) * 1e3, attempts.count)
            except AnytimeError as exc:
                pause = attempts.pause_s(exc)
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAnytimeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

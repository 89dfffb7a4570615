"""`AnytimeClient` (sync) and `AsyncAnytimeClient`: send an image with a deadline, get a typed answer.

The client sends the deadline as `X-Deadline-Ms` and gives up itself at the deadline plus a
margin (network and decoding), so a caller never waits much longer than the budget it set.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from client.errors import AnytimeError, BadInput, DeadlineExceeded, Overloaded, ServerError
from client.result import Result

ImageInput = str | Path | bytes | Any  # Any: an object with PIL's `save(fp, format=...)`
_MAGIC = [
    (b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"),
]  # fmt: skip


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


class _Base:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", deadline_ms: float | None = None,
        timeout_margin_ms: float = 250.0, timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.deadline_ms, self.margin_ms, self.timeout_s = deadline_ms, timeout_margin_ms, timeout_s

    def _prepare(
        self, image: ImageInput, deadline_ms: float | None, threshold: float | None, max_exit: int | None,
        top_k: int | None,
    ) -> tuple[dict[str, Any], float]:  # fmt: skip
        data, ctype = image_bytes(image)
        deadline = deadline_ms if deadline_ms is not None else self.deadline_ms
        headers = {"content-type": ctype}
        timeout = self.timeout_s
        if deadline is not None:
            headers["x-deadline-ms"] = f"{deadline:g}"
            timeout = (deadline + self.margin_ms) / 1e3
        params = {
            k: v for k, v in (("threshold", threshold), ("max_exit", max_exit), ("top_k", top_k)) if v is not None
        }
        return {"content": data, "headers": headers, "params": params, "timeout": timeout}, timeout

    @contextmanager
    def _transport_errors(self, timeout_s: float) -> Iterator[None]:
        """Turn httpx's transport failures into the client's typed errors."""
        try:
            yield
        except httpx.TimeoutException:
            raise DeadlineExceeded(f"no answer within {timeout_s * 1e3:.0f} ms") from None
        except httpx.TransportError as exc:
            raise AnytimeError(f"cannot reach {self.base_url}: {exc}") from None


class AnytimeClient(_Base):
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", deadline_ms: float | None = None,
                 timeout_margin_ms: float = 250.0, timeout_s: float = 30.0) -> None:  # fmt: skip
        super().__init__(base_url, deadline_ms, timeout_margin_ms, timeout_s)
        self._http = httpx.Client(base_url=self.base_url)

    def classify(
        self, image: ImageInput, deadline_ms: float | None = None, threshold: float | None = None,
        max_exit: int | None = None, top_k: int | None = None,
    ) -> Result:  # fmt: skip
        """Classify one image; raises BadInput, Overloaded, DeadlineExceeded or ServerError."""
        kwargs, timeout = self._prepare(image, deadline_ms, threshold, max_exit, top_k)
        start = time.perf_counter()
        with self._transport_errors(timeout):
            response = self._http.post("/classify", **kwargs)
        return Result.from_json(raise_for_answer(response), (time.perf_counter() - start) * 1e3)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AnytimeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAnytimeClient(_Base):
    """asyncio client. Use with `async with`, or `await aclose()`."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", deadline_ms: float | None = None,
        timeout_margin_ms: float = 250.0, timeout_s: float = 30.0, max_connections: int = 100,
    ) -> None:  # fmt: skip
        super().__init__(base_url, deadline_ms, timeout_margin_ms, timeout_s)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, limits=limits)

    async def classify(
        self, image: ImageInput, deadline_ms: float | None = None, threshold: float | None = None,
        max_exit: int | None = None, top_k: int | None = None,
    ) -> Result:  # fmt: skip
        """Classify one image; raises BadInput, Overloaded, DeadlineExceeded or ServerError."""
        kwargs, timeout = self._prepare(image, deadline_ms, threshold, max_exit, top_k)
        start = time.perf_counter()
        with self._transport_errors(timeout):
            response = await self._http.post("/classify", **kwargs)
        return Result.from_json(raise_for_answer(response), (time.perf_counter() - start) * 1e3)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAnytimeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

"""Warm-up of the request path: before readiness, every protocol answers a few requests of every model.

The engines' warm-up runs the stages; the first request over HTTP also paid for everything around
them (the first decode of a PNG, validators, JSON, multipart and protobuf code paths, the first
futures between threads, uvicorn's first POST on a connection): 8–12 ms instead of 2–4. So, before
`/readyz` says ready, each form of `/classify`, the Open Inference Protocol's JSON and binary REST
forms and its gRPC `ModelInfer` run in process through the very ASGI stack and servicer that serve
clients (`warm_request_paths`), and then the same HTTP requests go over the server's own socket
once it listens (`warm_over_socket`; they carry a per-server token in `X-Anytime-Warmup`). None of
them is counted in the metrics (service/dataplane.py `warming_up`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from typing import Any

from PIL import Image
from starlette.types import ASGIApp, Message
from tritonclient.grpc import service_pb2 as pb

from service.dataplane import WARMUP_HEADER, WARMUP_TOKEN, DataPlane, warming_up
from service.protocols import v2_grpc
from service.served import Served

log = logging.getLogger("anytime.serve")
ROUNDS = 3


async def asgi_request(
    app: ASGIApp, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, query: str = ""
) -> tuple[int, bytes]:
    """One HTTP request through an ASGI app in process: (status, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    given = False
    status, chunks = 0, []

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def _png(model: Served) -> bytes:
    spec = model.input
    mode = "L" if spec.channels == 1 else "RGB"
    buf = io.BytesIO()
    Image.new(mode, (spec.size, spec.size), 128 if mode == "L" else (128, 96, 64)).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(png: bytes) -> tuple[bytes, str]:
    boundary = "anytime-warmup"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="w.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _http_requests(model: Served, default: bool) -> list[tuple[str, bytes, dict[str, str], str]]:
    """(path, body, headers, query) of every HTTP form, for one model."""
    png = _png(model)
    classify = "/classify" if default else f"/v1/models/{model.name}/classify"
    form, form_type = _multipart(png)
    b64 = base64.b64encode(png).decode()
    infer = f"/v2/models/{model.name}/infer"
    element = len(png).to_bytes(4, "little") + png
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "exit"}],
        }
    ).encode()
    v2_json = json.dumps(
        {
            "parameters": {"deadline_ms": 1000, "threshold": 0.5},
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}, {"name": "label"}],
        }
    ).encode()
    return [
        (classify, png, {"content-type": "image/png"}, ""),
        (classify, png, {"content-type": "image/png", "x-deadline-ms": "1000"}, "top_k=2&max_exit=1"),
        (classify, json.dumps({"image": b64, "top_k": 2}).encode(), {"content-type": "application/json"}, ""),
        (classify, form, {"content-type": form_type}, ""),
        (infer, v2_json, {"content-type": "application/json"}, ""),
        (infer, head + element, {"inference-header-content-length": str(len(head))}, ""),
        (infer, png, {"inference-header-content-length": "0"}, ""),
    ]


class _Context:
    """What ModelInfer asks of a gRPC call's context, for an in-process call."""

    def time_remaining(self) -> float:
        return 1.0

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"gRPC warm-up call failed: {code} {details}")


async def warm_request_paths(app: ASGIApp, plane: DataPlane) -> None:
    """`ROUNDS` requests of every form and protocol to every served model (failures are logged, not fatal)."""
    servicer = v2_grpc.InferenceServicer(plane)
    async with warming_up():
        for model in plane.registry.served():
            requests = _http_requests(model, model.name == plane.registry.default)
            png = _png(model)
            grpc_request = pb.ModelInferRequest(model_name=model.name)
            grpc_request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
            for r in range(ROUNDS):
                start = time.perf_counter()
                for path, body, headers, query in requests:
                    status, text = await asgi_request(app, "POST", path, body, headers, query)
                    if status != 200 and r == 0:
                        log.warning("warm-up request %s answered %d: %s", path, status, text[:200])
                try:
                    await servicer.ModelInfer(grpc_request, _Context())
                except RuntimeError as exc:
                    log.warning("%s", exc)
                await asyncio.sleep(0)
                log.debug("warm-up round %d of %s: %.1f ms", r + 1, model.name, (time.perf_counter() - start) * 1e3)


async def _http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    path: str,
    body: bytes,
    headers: dict[str, str],
    query: str,
) -> int:
    """One keep-alive HTTP/1.1 POST on an open connection; its status (the body is read and dropped)."""
    target = f"{path}?{query}" if query else path
    head = {"host": "warmup", "content-length": str(len(body)), WARMUP_HEADER: WARMUP_TOKEN, **headers}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    writer.write(f"POST {target} HTTP/1.1\r\n{lines}\r\n".encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def warm_over_socket(host: str, port: int, plane: DataPlane) -> None:
    """The HTTP warm-up requests again, over the listening socket (what a client's first request takes)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)
    except OSError as exc:
        log.warning("socket warm-up skipped: %s", exc)
        return
    try:
        for model in plane.registry.served():
            for _ in range(ROUNDS):
                for path, body, headers, query in _http_requests(model, model.name == plane.registry.default):
                    await _http(reader, writer, path, body, headers, query)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
        log.warning("socket warm-up stopped: %s", exc)
    finally:
        writer.close()

"""Refusal from the headers (service/protocols/early.py): a raw-body /classify that admission would refuse
is answered from uvicorn's protocol, as the endpoint would answer it, on a connection that goes on
working (keep-alive, pipelining, `Connection: close`), and counted as the endpoint counts it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.engine import QueueFull
from service.protocols.classify import error_json
from tests.helpers import HttpReader, ServerProcess, make_artifact, metric, png_bytes, raw_request

IMAGES = [png_bytes(Image.new("L", (28, 28), shade)) for shade in range(0, 250, 10)]


def _request(body: bytes, budget_ms: str | None = "15", path: str = "/classify", extra: str = "") -> bytes:
    # A 15 ms budget unless told: exit 1 (25 ms) cannot meet it, and a slow VM's read and parse do not use it
    # up, so each refusal says why the engine would refuse it rather than that the deadline passed.
    return raw_request(body, budget_ms, path, extra)


def test_a_request_admission_would_refuse_is_refused_from_its_headers_as_the_endpoint_does(
    tmp_path: Path, workers: int
) -> None:
    # Exit 1 takes 25 ms: every 15 ms budget is refused before decoding.
    make_artifact(tmp_path, "sleepy", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[25] * 4)
    srv = ServerProcess(tmp_path, "sleepy", warmup="false", workers=workers).wait_ready()
    images = iter(IMAGES)  # another image each time: none is a resend the pushback would hold
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            reader = HttpReader(sock)
            sock.sendall(_request(next(images)))  # the first refusal: by the endpoint
            by_endpoint = reader.response()
            sock.sendall(_request(next(images)))  # one just after: from the headers
            from_headers = reader.response()
            # Pipelined: a refusal, an answer, a refusal, in one write; the answers come in order.
            sock.sendall(_request(next(images)) + _request(next(images), "5000") + _request(next(images)))
            pipelined = [reader.response() for _ in range(3)]
            sock.sendall(_request(b"not an image"))  # refused before the body is looked at
            not_an_image = reader.response()
            sock.sendall(_request(next(images), extra="Connection: close\r\n"))
            closing = reader.response()
            end = sock.recv(1)  # the server closed the connection after that refusal
        multipart = httpx.post(  # a form the headers cannot decide: the endpoint's refusal
            f"{srv.url}/classify", files={"file": ("a.png", next(images), "image/png")}, headers={"x-deadline-ms": "15"}
        )
        page = httpx.get(f"{srv.url}/metrics").text
    finally:
        assert srv.stop() == 0
    for status, headers, body in (by_endpoint, from_headers, pipelined[0], pipelined[2], not_an_image, closing):
        assert status == 504 and headers["content-type"] == "application/json", (status, headers, body)
        assert b'"code":"deadline_exceeded"' in body, body
        # The one behind the answer waited in the pipeline for it, past its budget: counted from when it was read.
        behind = body is pipelined[2][2]
        why = b"the deadline passed before the engine" if behind else b"exit 1 cannot be reached in time"
        assert why in body, body
    assert from_headers[1].keys() == by_endpoint[1].keys()  # date, server, content-length, content-type
    assert multipart.status_code == 504 and "exit 1 cannot be reached" in multipart.json()["error"]["message"]
    assert pipelined[1][0] == 200, pipelined[1]  # admitted on a connection refused from the headers before
    assert closing[1]["connection"] == "close" and end == b""
    # Six refusals on the socket and the multipart one; from the headers: not the first (no refusal in
    # the last 100 ms before it), nor the one pipelined behind an answer.
    assert metric(page, "anytime_requests_total", status="504") == 7
    assert metric(page, "anytime_deadline_total", outcome="rejected") == 7
    assert metric(page, "anytime_refused_from_headers_total") == 4


@pytest.mark.parametrize("message", ["exit 1 is predicted 3.2 ms from now", 'ünï \n\t\\ \u2028 \x00 😀 " /', ""])
def test_the_error_body_is_what_json_dumps_writes(message: str) -> None:
    """A refusal's body is formatted around the two escaped strings (a refusal per request under overload);
    it must stay byte for byte the JSON of the error object."""
    error = QueueFull(message)
    body = {"error": {"code": error.code, "message": error.message}}
    assert error_json(error) == json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    assert json.loads(error_json(error)) == body

"""A hostile image corpus, generated here, against a real server: each case gets the right status,
and valid-but-odd images are classified."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.preprocess import Preprocess
from service.images import decode_image
from tests.helpers import FMNIST_INPUT, ServerProcess, make_artifact, png_bytes

MAX_PIXELS = 250_000
MAX_BODY = 300_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, workers: int) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("hostile")
    make_artifact(store, "tiny", "test_tiny")
    limits = {"max_body_bytes": MAX_BODY, "max_image_pixels": MAX_PIXELS}
    srv = ServerProcess(store, "tiny", workers=workers, **limits).wait_ready()
    yield srv
    assert srv.stop() == 0


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is a few bytes (a bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Image.Image:
    arr = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encoded(_gradient(), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [_gradient("P"), _gradient("P").rotate(90)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    return encoded(_gradient(), "TIFF", save_all=True, append_images=[_gradient("L")])


VALID_BUT_ODD = {
    "16-bit PNG": lambda: png_bytes(Image.fromarray((np.arange(784).reshape(28, 28) * 80).astype(np.uint16))),
    "CMYK JPEG": lambda: encoded(_gradient("CMYK"), "JPEG"),
    "palette PNG": lambda: png_bytes(_gradient("P")),
    "RGBA PNG": lambda: png_bytes(_gradient("RGBA")),
    "animated GIF": _animated_gif,
    "multi-page TIFF": _multipage_tiff,
    "EXIF-rotated JPEG": _exif_rotated_jpeg,
    "PNG just under the pixel limit": lambda: png_bytes(Image.new("L", (499, 500), 7)),
    "1x1 BMP": lambda: encoded(Image.new("RGB", (1, 1)), "BMP"),
    "WebP": lambda: encoded(_gradient(), "WEBP"),
}
REJECTED = {
    "zero bytes": (b"", 400),
    "text as image/png": (b"hello, I am not a picture", 400),
    "truncated PNG": (png_bytes(_gradient())[:60], 400),
    "truncated JPEG": (encoded(_gradient(), "JPEG")[:200], 400),
    "100000x100000 PNG header": (png_header_only(100_000, 100_000), 413),
    "PNG just over the pixel limit": (png_bytes(Image.new("L", (501, 500))), 413),
    "ICO (a format we do not accept)": (encoded(_gradient(), "ICO"), 415),
}


def post_image(server: ServerProcess, data: bytes, ctype: str = "image/png", **params: object) -> httpx.Response:
    return httpx.post(
        f"{server.url}/classify", content=data, headers={"content-type": ctype}, params=params, timeout=30
    )


def _is_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] and err["message"] and "Traceback" not in r.text


@pytest.mark.parametrize("name", list(VALID_BUT_ODD))
def test_valid_but_odd_images_are_classified(server: ServerProcess, name: str) -> None:
    r = post_image(server, VALID_BUT_ODD[name]())
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["exit"] <= 3


@pytest.mark.parametrize("name", list(REJECTED))
def test_bad_images_get_the_right_status(server: ServerProcess, name: str) -> None:
    data, status = REJECTED[name]
    _is_error(post_image(server, data), status)


def test_exif_orientation_is_applied() -> None:
    tf = Preprocess(FMNIST_INPUT)
    rotated = decode_image(_exif_rotated_jpeg(), FMNIST_INPUT, tf, MAX_PIXELS)
    upright = Image.open(io.BytesIO(_exif_rotated_jpeg())).transpose(Image.Transpose.ROTATE_270)
    expected = decode_image(png_bytes(upright), FMNIST_INPUT, tf, MAX_PIXELS)
    assert (rotated - expected).abs().max() < 0.05  # JPEG vs PNG re-encoding, same orientation


def test_base64_errors(server: ServerProcess) -> None:
    _is_error(httpx.post(f"{server.url}/classify", json={"image": "@@@not-base64@@@"}), 400)
    _is_error(httpx.post(f"{server.url}/classify", json={"image": base64.b64encode(b"plain text").decode()}), 400)
    _is_error(
        httpx.post(f"{server.url}/classify", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    _is_error(httpx.post(f"{server.url}/classify", json={"picture": "x"}), 422)
    _is_error(httpx.post(f"{server.url}/classify", json=["image"]), 422)


def test_wrong_or_missing_content_types(server: ServerProcess) -> None:
    png = png_bytes(_gradient())
    for ctype in ("text/plain", "application/octet-stream", "application/xml"):
        _is_error(post_image(server, png, ctype), 415)
    r = httpx.post(f"{server.url}/classify", content=png, headers={"content-type": ""})
    _is_error(r, 415)
    _is_error(httpx.post(f"{server.url}/classify", files={"image": ("x.png", png)}), 422)  # wrong field name
    _is_error(httpx.post(f"{server.url}/classify/batch", content=png, headers={"content-type": "image/png"}), 415)


@pytest.mark.parametrize(
    "params",
    [
        {"deadline_ms": "NaN"}, {"deadline_ms": "inf"}, {"deadline_ms": -5}, {"deadline_ms": 0}, {"deadline_ms": True},
        {"threshold": -0.1}, {"threshold": 1.5}, {"threshold": "nan"}, {"threshold": "high"},
        {"top_k": 0}, {"top_k": 1_000_000}, {"top_k": 1.5}, {"max_exit": 0}, {"max_exit": 99}, {"max_exit": "last"},
    ],
)  # fmt: skip
def test_options_of_every_wrong_type_and_range(server: ServerProcess, params: dict) -> None:
    _is_error(post_image(server, png_bytes(_gradient()), **params), 422)


def test_a_body_over_the_limit_sent_slowly_is_cut_off(server: ServerProcess) -> None:
    def slow_body() -> Iterator[bytes]:
        for _ in range(40):  # 40 x 10 kB over about 2 s: past the 300 kB limit
            time.sleep(0.05)
            yield b"\x00" * 10_000

    start = time.monotonic()
    r = httpx.post(f"{server.url}/classify", content=slow_body(), headers={"content-type": "image/png"}, timeout=30)
    _is_error(r, 413)
    assert time.monotonic() - start < 10
    _is_error(post_image(server, b"\x00" * (MAX_BODY + 1)), 413)  # declared by Content-Length
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_hostile_corpus_leaves_the_server_healthy(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert post_image(server, png_bytes(_gradient())).status_code == 200
    assert server.proc.poll() is None


def test_corpus_size_is_reported() -> None:
    assert len(VALID_BUT_ODD) + len(REJECTED) >= 17
    assert Path(__file__).stat().st_size < 20_000  # the corpus is generated, not committed


def test_large_images_are_decoded_off_the_event_loop_to_the_same_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images over ANYTIME_INLINE_DECODE_PIXELS go to a thread; the tensor is the same either way."""
    import asyncio
    import threading

    import torch

    import service.served
    from models.artifact import load_artifact
    from service.config import ServiceSettings
    from service.metrics import Metrics
    from service.served import ServedModel

    artifact = load_artifact(make_artifact(tmp_path, "tiny", "test_tiny"))
    png = png_bytes(_gradient("L", (300, 300)))
    threads: list[str] = []
    finish = service.served.finish_image

    def spy(*args):
        threads.append(threading.current_thread().name)
        return finish(*args)

    monkeypatch.setattr(service.served, "finish_image", spy)

    def prepared(inline_pixels: int) -> torch.Tensor:
        settings = ServiceSettings(inline_decode_pixels=inline_pixels)
        metrics = Metrics().for_model("tiny", "1", "cpu")
        return asyncio.run(ServedModel(artifact, None, settings, metrics).prepare(png))

    inline, pooled = prepared(10**6), prepared(1000)
    assert torch.equal(inline, pooled)
    assert threads[0] == threading.main_thread().name and threads[1] != threading.main_thread().name


def test_a_multipart_body_with_too_many_fields_is_a_400_not_a_500(server: ServerProcess) -> None:
    fields = {f"f{i}": "x" for i in range(12)}
    r = httpx.post(f"{server.url}/classify", data=fields, files={"file": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text

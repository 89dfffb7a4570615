"""Reading IDX files (the MNIST family's format), gzipped or not; needs only NumPy."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


class IdxError(ValueError):
    """Not an unsigned-byte IDX file, or a truncated one."""


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (optionally gzipped)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise IdxError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise IdxError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)

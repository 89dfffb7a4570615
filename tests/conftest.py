"""Shared fixtures: deterministic RNG state per test, both process models, and the `cuda` marker's skip."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.seed import seed_everything


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def workers(request: pytest.FixtureRequest) -> int:
    """ANYTIME_WORKERS for a server test that holds in both process models: one process, and two request
    processes in front of an engine process."""
    return request.param


@pytest.fixture(autouse=True)
def _seeded_rng() -> Iterator[None]:
    """Seed every generator for the test and restore the previous state afterwards."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    seed_everything(0)
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])

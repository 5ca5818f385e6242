"""Fixtures for the end-to-end tests: process bookkeeping, an HTTP client, device data files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fedge_processes import DigitsFiles, Processes

from fedge.data import load_federated


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], DigitsFiles]:
    """``digits(n)``: a Dirichlet(0.5) split of the digits over ``n`` devices, written once per ``n``."""
    made: dict[int, DigitsFiles] = {}

    def files(n: int) -> DigitsFiles:
        if n not in made:
            fed = load_federated("digits", partition="dirichlet:0.5", num_devices=n, seed=0)
            folder = tmp_path_factory.mktemp(f"digits-{n}")
            paths = []
            for i, d in enumerate(fed.devices):
                paths.append(folder / f"device-{i}.npz")
                np.savez(paths[-1], x=d.x, y=d.y)
            np.savez(folder / "test.npz", x=fed.test.x, y=fed.test.y)
            made[n] = DigitsFiles(paths, folder / "test.npz")
        return made[n]

    return files


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """The test's processes; every one still running is SIGKILLed (with its group) at teardown."""
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client

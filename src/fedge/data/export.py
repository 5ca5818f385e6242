"""Write a federated data set out as one ``.npz`` file per device, plus the test split.

This is how a rehearsal (containers, ``fedge demo``, a lab) gives every
agent its own local data file: ``fedge data split --devices 3 --out DIR``
writes ``device-0.npz`` ... ``device-2.npz`` and ``test.npz``, each with
arrays ``x`` (float) and ``y`` (int labels), the layout the agent reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedge.data import load_federated
from fedge.errors import ConfigError

__all__ = ["write_split"]


def write_split(
    out_dir: Path, *, data: str = "digits", partition: str | None = "dirichlet:0.5",
    devices: int | None = None, seed: int = 0, prefix: str = "device-",
) -> tuple[list[Path], Path]:
    """Partition ``data`` over ``devices`` and write each share; return (device files, test file).

    Raises:
        ConfigError: a bad name or count, or ``out_dir`` already holds device files.
    """
    fed = load_federated(data, partition=partition, num_devices=devices, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(f"{prefix}*.npz"))
    if existing:
        raise ConfigError(
            f"{out_dir} already holds device data ({existing[0].name}, ...); use an empty folder"
        )
    paths = []
    for i, d in enumerate(fed.devices):
        paths.append(_save(out_dir / f"{prefix}{i}.npz", d.x, d.y))
    return paths, _save(out_dir / "test.npz", fed.test.x, fed.test.y)


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, x=x, y=y)
    os.replace(tmp, path)
    return path

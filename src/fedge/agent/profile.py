"""A device's capability profile: what it has, and how fast it trains the task.

Sent at check-in so the coordinator can estimate how long a round takes on
this device (heterogeneity-aware selection). The static part (cores,
memory, architecture, accelerators) is read once; the micro-benchmark (one
local epoch over a few hundred synthetic examples of the task's shape, timed)
runs when the task is first seen and again after ``refresh_s``, and is cached
in ``state_dir/profile.json`` so a restart does not repeat it.

Accelerators are detected without importing torch or CUDA libraries: the
NVIDIA driver's ``/proc/driver/nvidia/version`` or a ``/dev/nvidia0``
device (a discrete GPU), or ``/etc/nv_tegra_release`` (a Jetson board).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Profile", "ProfileCache", "static_profile"]

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
_DEFAULT_REFRESH_S = 24 * 3600.0


@dataclass(frozen=True)
class Profile:
    """A device's capabilities; ``examples_per_s`` is ``None`` until the benchmark ran.

    Attributes:
        cores: logical CPU cores.
        memory_mb: total memory, MiB.
        arch: the machine (``x86_64``, ``aarch64``...).
        accelerators: ``["cuda"]``, ``["jetson"]`` or ``[]``.
        examples_per_s: training throughput on the current task (one local epoch).
        task: the task the throughput was measured on.
        measured_at: when it was measured (seconds since the epoch).
    """

    cores: int
    memory_mb: float
    arch: str
    accelerators: tuple[str, ...]
    examples_per_s: float | None = None
    task: str | None = None
    measured_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["accelerators"] = list(self.accelerators)
        return d


def static_profile(root: Path = Path("/")) -> Profile:
    """Cores, memory, architecture and accelerators (no benchmark)."""
    memory_mb = 0.0
    try:
        for line in (root / "proc" / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_mb = int(line.split()[1]) / 1024.0
                break
    except (OSError, ValueError, IndexError):
        pass
    accelerators = []
    if (root / "proc" / "driver" / "nvidia" / "version").exists() or (root / "dev" / "nvidia0").exists():
        accelerators.append("cuda")
    if (root / "etc" / "nv_tegra_release").exists():
        accelerators.append("jetson")
    return Profile(cores=os.cpu_count() or 1, memory_mb=round(memory_mb, 1), arch=platform.machine(),
                   accelerators=tuple(accelerators))


class ProfileCache:
    """The profile with its benchmark, kept in ``state_dir/profile.json``.

    Args:
        state_dir: the agent's state directory.
        refresh_s: re-run the benchmark after this many seconds.
        clock: wall-clock seconds (the measurement's date).
    """

    def __init__(self, state_dir: Path, *, refresh_s: float = _DEFAULT_REFRESH_S,
                 clock: Callable[[], float] = time.time, root: Path = Path("/")) -> None:
        self.path = state_dir / PROFILE_FILE
        self.refresh_s = refresh_s
        self._clock = clock
        self._profile = static_profile(root)
        cached = self._load()
        if cached is not None:
            self._profile = cached

    @property
    def profile(self) -> Profile:
        return self._profile

    def stale(self, task: str) -> bool:
        """Whether the benchmark should run (again) for ``task``."""
        p = self._profile
        return (p.examples_per_s is None or p.task != task or p.measured_at is None
                or self._clock() - p.measured_at > self.refresh_s)

    def measure(self, task: str, bench: Callable[[], tuple[int, float]]) -> Profile:
        """Run ``bench`` (returns examples trained and seconds taken) and keep the throughput."""
        examples, seconds = bench()
        rate = examples / max(seconds, 1e-6)
        self._profile = Profile(
            cores=self._profile.cores, memory_mb=self._profile.memory_mb, arch=self._profile.arch,
            accelerators=self._profile.accelerators, examples_per_s=round(rate, 1), task=task,
            measured_at=self._clock(),
        )
        self._save()
        logger.info("capability benchmark: %.0f examples/s on task %s", rate, task)
        return self._profile

    def _load(self) -> Profile | None:
        try:
            d = json.loads(self.path.read_text())
            p = Profile(cores=int(d["cores"]), memory_mb=float(d["memory_mb"]), arch=str(d["arch"]),
                        accelerators=tuple(str(a) for a in d["accelerators"]),
                        examples_per_s=None if d["examples_per_s"] is None else float(d["examples_per_s"]),
                        task=d["task"], measured_at=d["measured_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring the unreadable profile cache %s (%s)", self.path, e)
            return None
        # The hardware may have changed (a restored state directory on another board).
        static = self._profile
        if (p.cores, p.arch) != (static.cores, static.arch):
            return None
        return p

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self._profile.to_json()) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning("cannot cache the profile in %s (%s)", self.path, e)

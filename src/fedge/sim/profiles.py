"""Simulated device heterogeneity and a virtual clock (``fedge simulate --profiles``).

Each virtual device gets a :class:`DeviceProfile`: how fast it trains
(examples per second), its link's bandwidth, when in the day it is
available, and how likely it is to drop out of a round it joined. Profiles
come from distributions::

    --profiles lognormal-speed:10,diurnal,dropout:0.05,bandwidth:1

(``lognormal-speed:SPREAD[:MEDIAN]``: speeds lognormal around MEDIAN examples/s
(50 by default), with 90% of devices inside a SPREAD-fold range; ``diurnal[:HOURS]``: each device is
available HOURS a day, 12 by default, starting at a random hour;
``dropout:P``: each invited device drops out with probability P;
``bandwidth:MBPS[:SPREAD]``: link speed in megabytes per second, lognormal
with the same SPREAD rule; 1 MB/s by default), or from a trace file (CSV or
JSON, one row per device: ``speed``, and optionally ``bandwidth_mbps``,
``window`` as ``"HH:MM-HH:MM"`` and ``dropout``).

:class:`FleetModel` is the virtual clock: a round invites devices available
at the current virtual time; each takes ``epochs * examples / speed`` to
train plus ``2 * model bytes / bandwidth`` to download and upload; devices
that drop out or would miss the deadline never report; the round lasts
until its last report (or its deadline), and the clock moves on by that
plus ``overhead_s``. Nothing here reads the wall clock.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.errors import ConfigError

__all__ = ["DeviceProfile", "FleetModel", "build_profiles"]

DEFAULT_SPEED = 50.0  # examples per second: a small ARM board on a small model
DEFAULT_BANDWIDTH_MBPS = 1.0
_DAY_S = 24 * 3600.0
_Z90 = 1.6448536269514722  # the 95th percentile of the standard normal


@dataclass(frozen=True)
class DeviceProfile:
    """One virtual device's speed, link, availability and reliability."""

    speed: float  # examples per second of local training
    bandwidth: float  # bytes per second, each way
    window: tuple[float, float] | None = None  # hours of the day [start, end), may wrap; None: always
    dropout: float = 0.0

    def available_at(self, t: float) -> bool:
        if self.window is None:
            return True
        hour = (t % _DAY_S) / 3600.0
        start, end = self.window
        return start <= hour < end if start < end else (hour >= start or hour < end)


def _sigma(spread: float) -> float:
    """The lognormal sigma that puts 90% of the mass inside a ``spread``-fold range."""
    return math.log(spread) / (2 * _Z90)


def _number(text: str, term: str, low: float, high: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--profiles {term!r}: expected a number, got {text!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ConfigError(f"--profiles {term!r}: the value must be {bound}, got {value:g}")
    return value


def build_profiles(spec: str, num_devices: int, rng: np.random.Generator, *,
                   base: Path | None = None) -> list[DeviceProfile]:
    """Profiles for ``num_devices`` devices from a ``--profiles`` spec or a trace file.

    Raises:
        ConfigError: an unknown term, a bad value, or a trace that is unreadable or malformed.
    """
    path = Path(spec) if base is None or Path(spec).is_absolute() else base / spec
    if spec.endswith((".csv", ".json")):
        return _load_trace(path, num_devices)
    speed_sigma = bandwidth_sigma = 0.0
    speed = DEFAULT_SPEED
    bandwidth = DEFAULT_BANDWIDTH_MBPS
    hours: float | None = None
    dropout = 0.0
    seen: set[str] = set()
    for term in (t.strip() for t in spec.split(",")):
        name, _, arg = term.partition(":")
        if name in seen:
            raise ConfigError(f"--profiles names {name!r} twice")
        seen.add(name)
        if name == "lognormal-speed":
            spread, _, median = arg.partition(":")
            speed_sigma = _sigma(_number(spread, term, 1.0) if spread else 10.0)
            speed = _number(median, term, 1e-6) if median else DEFAULT_SPEED
        elif name == "diurnal":
            hours = _number(arg, term, 1.0, 24.0) if arg else 12.0
        elif name == "dropout":
            dropout = _number(arg, term, 0.0, 1.0)
        elif name == "bandwidth":
            mbps, _, spread = arg.partition(":")
            bandwidth = _number(mbps, term, 1e-6)
            bandwidth_sigma = _sigma(_number(spread, term, 1.0)) if spread else 0.0
        else:
            raise ConfigError(
                f"--profiles: unknown term {term!r}; known: lognormal-speed:SPREAD[:MEDIAN], "
                "diurnal[:HOURS], dropout:P, bandwidth:MBPS[:SPREAD], or a .csv/.json trace file"
            )
    speeds = speed * np.exp(speed_sigma * rng.standard_normal(num_devices))
    links = bandwidth * 1e6 * np.exp(bandwidth_sigma * rng.standard_normal(num_devices))
    starts = rng.uniform(0, 24, size=num_devices)
    return [
        DeviceProfile(
            speed=float(speeds[i]), bandwidth=float(links[i]),
            window=None if hours is None or hours >= 24
            else (float(starts[i]), float((starts[i] + hours) % 24)),
            dropout=dropout,
        )
        for i in range(num_devices)
    ]


def _load_trace(path: Path, num_devices: int) -> list[DeviceProfile]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--profiles {path}: cannot read ({e.strerror})") from None
    rows: list[Mapping[str, Any]]
    if path.suffix == ".json":
        try:
            loaded = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--profiles {path}: not valid JSON ({e})") from None
        if not isinstance(loaded, list) or not all(isinstance(r, dict) for r in loaded):
            raise ConfigError(f"--profiles {path}: expected a JSON list of objects, one per device")
        rows = loaded
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if len(rows) < num_devices:
        raise ConfigError(f"--profiles {path}: {len(rows)} devices in the trace, the run has {num_devices}")
    return [_row(path, i + 1, r) for i, r in enumerate(rows[:num_devices])]


def _row(path: Path, line: int, row: Mapping[str, Any]) -> DeviceProfile:
    where = f"--profiles {path}: device {line}"
    unknown = set(row) - {"device", "speed", "bandwidth_mbps", "window", "dropout"}
    if unknown:
        raise ConfigError(f"{where}: unknown column {sorted(unknown)[0]!r}")
    try:
        speed = float(row["speed"])
        bandwidth = float(row.get("bandwidth_mbps") or DEFAULT_BANDWIDTH_MBPS) * 1e6
        dropout = float(row.get("dropout") or 0.0)
    except KeyError:
        raise ConfigError(f"{where}: no speed") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if not (math.isfinite(speed) and speed > 0) or not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ConfigError(f"{where}: speed and bandwidth_mbps must be positive")
    if not 0 <= dropout <= 1:
        raise ConfigError(f"{where}: dropout must be in [0, 1], got {dropout:g}")
    window = None
    text = row.get("window") or ""
    if text:
        from fedge.agent.policy import parse_policy

        ((start, end),) = parse_policy({"windows": [str(text)]}, source=where).windows
        window = (start / 60.0, end / 60.0)
    return DeviceProfile(speed=speed, bandwidth=bandwidth, window=window, dropout=dropout)


class FleetModel:
    """The virtual clock over profiled devices (see the module docstring)."""

    def __init__(self, profiles: Sequence[DeviceProfile], num_examples: Sequence[int], *,
                 model_bytes: int, deadline_s: float | None, overhead_s: float = 1.0) -> None:
        if len(profiles) != len(num_examples):
            raise ConfigError(f"{len(profiles)} profiles for {len(num_examples)} devices")
        self.profiles = list(profiles)
        self.num_examples = np.asarray(num_examples, dtype=np.float64)
        self.model_bytes = model_bytes
        self.deadline_s = deadline_s
        self.overhead_s = overhead_s
        self.now = 0.0
        self.invited = np.zeros(len(profiles), dtype=np.int64)
        self.reported = np.zeros(len(profiles), dtype=np.int64)

    def available(self) -> np.ndarray:
        """The devices available at the current virtual time."""
        now = self.now
        return np.array([i for i, p in enumerate(self.profiles) if p.available_at(now)], dtype=np.int64)

    def wait_for_devices(self, step_s: float = 900.0) -> np.ndarray:
        """Move the clock forward (in ``step_s`` steps, at most a day) until someone is available."""
        for _ in range(int(_DAY_S // step_s) + 1):
            ids = self.available()
            if ids.size:
                return ids
            self.now += step_s
        return self.available()

    def estimate_s(self, device: int, epochs: int) -> float:
        """How long a round takes ``device``: training plus the model down and the update up."""
        p = self.profiles[device]
        return float(epochs * self.num_examples[device] / p.speed + 2 * self.model_bytes / p.bandwidth)

    def play(self, cohort: Sequence[int], epochs: Mapping[int, int], rng: np.random.Generator
             ) -> tuple[list[int], list[int], float]:
        """Which invited devices finish, which drop out (by chance or the deadline), and how long
        the round lasts in virtual seconds."""
        finished, lost, longest = [], [], 0.0
        for d in cohort:
            self.invited[d] += 1
            took = self.estimate_s(d, epochs[d])
            late = self.deadline_s is not None and took > self.deadline_s
            if late or rng.random() < self.profiles[d].dropout:
                lost.append(d)
                continue
            finished.append(d)
            self.reported[d] += 1
            longest = max(longest, took)
        if lost and self.deadline_s is not None:
            longest = self.deadline_s  # a round with dropouts waits for its deadline
        return finished, lost, longest

    def advance(self, round_s: float) -> None:
        self.now += round_s + self.overhead_s

    def participation(self) -> dict[str, float]:
        """Rounds reported per device, for the slowest and fastest tenths of the fleet by speed."""
        order = np.argsort([p.speed for p in self.profiles])
        tenth = max(1, len(order) // 10)
        return {
            "slowest_decile_rounds": float(self.reported[order[:tenth]].mean()),
            "fastest_decile_rounds": float(self.reported[order[-tenth:]].mean()),
            "mean_rounds": float(self.reported.mean()),
            "never_reported": int((self.reported == 0).sum()),
        }

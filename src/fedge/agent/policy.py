"""When a device may train: the ``[policy]`` table of the agent's config, and its verdict.

::

    [policy]
    require_ac = true                 # only on mains/USB power
    min_battery_percent = 40          # and never below this charge
    max_cpu_load = 0.5                # other work may use at most half the cores
    min_memory_mb = 256               # MemAvailable
    max_temperature_c = 70            # the hottest thermal zone
    min_disk_mb = 100                 # free space for the state directory
    windows = ["22:00-06:00"]         # local time; a window may wrap midnight
    max_rounds_per_day = 24           # local day
    unknown = "allow"                 # what an unknown reading means: "allow" or "deny"

Every key is optional; an absent key sets no condition. :func:`verdict`
returns whether training may run now and, either way, the reasons, which go
with every check-in so the coordinator (and its operator) knows why a device
is not training. The same check runs again while training (see
:mod:`fedge.agent.trainer`): ``busy`` readings pause training; ``unsafe`` ones
(unplugged, battery low, too hot, out of memory or disk, outside the
windows) stop it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedge.agent.monitor import Readings
from fedge.errors import ConfigError

__all__ = ["POLICY_KEYS", "Policy", "Verdict", "parse_policy", "verdict"]

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")

POLICY_KEYS = ("require_ac", "min_battery_percent", "max_cpu_load", "min_memory_mb", "max_temperature_c",
               "min_disk_mb", "windows", "max_rounds_per_day", "unknown")


@dataclass(frozen=True)
class Policy:
    """A device's training conditions (see the module docstring); ``None``: no condition."""

    require_ac: bool = False
    min_battery_percent: float | None = None
    max_cpu_load: float | None = None
    min_memory_mb: float | None = None
    max_temperature_c: float | None = None
    min_disk_mb: float | None = None
    windows: tuple[tuple[int, int], ...] = ()  # minutes since local midnight, [start, end)
    max_rounds_per_day: int | None = None
    unknown: str = "allow"

    @property
    def empty(self) -> bool:
        return self == Policy()


@dataclass(frozen=True)
class Verdict:
    """Whether training may run, and why not.

    ``reasons`` name every failed condition (``"cpu load 0.83 > 0.5"``);
    ``pause`` is true when only transient load failed (busy CPU), so a
    running round should wait rather than give up.
    """

    ok: bool
    reasons: tuple[str, ...] = ()
    pause: bool = False
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reasons": list(self.reasons), "notes": list(self.notes)}


def parse_policy(table: Mapping[str, Any], *, source: str = "[policy]") -> Policy:
    """Check a ``[policy]`` table; every bad key or value is named.

    Raises:
        ConfigError: an unknown key, or a value of the wrong type or range.
    """
    for key in table:
        if key not in POLICY_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}; known: {', '.join(POLICY_KEYS)}")
    values: dict[str, Any] = {}
    if "require_ac" in table:
        if not isinstance(table["require_ac"], bool):
            raise ConfigError(f"{source}: require_ac must be true or false, got {table['require_ac']!r}")
        values["require_ac"] = table["require_ac"]
    ranges = {"min_battery_percent": (0.0, 100.0), "max_cpu_load": (0.0, 1.0),
              "min_memory_mb": (0.0, math.inf), "max_temperature_c": (-40.0, 150.0),
              "min_disk_mb": (0.0, math.inf)}
    for key, (low, high) in ranges.items():
        if key in table:
            values[key] = _number(table[key], key, low, high, source)
    if "max_rounds_per_day" in table:
        n = table["max_rounds_per_day"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{source}: max_rounds_per_day must be an integer >= 1, got {n!r}")
        values["max_rounds_per_day"] = n
    if "windows" in table:
        values["windows"] = _windows(table["windows"], source)
    if "unknown" in table:
        if table["unknown"] not in ("allow", "deny"):
            raise ConfigError(f"{source}: unknown must be \"allow\" or \"deny\", got {table['unknown']!r}")
        values["unknown"] = table["unknown"]
    return Policy(**values)


def _number(value: object, key: str, low: float, high: float, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if not low <= value <= high:
        bound = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise ConfigError(f"{source}: {key} must be {bound}, got {value!r}")
    return float(value)


def _windows(value: object, source: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: windows must be a non-empty list like [\"22:00-06:00\"], got {value!r}")
    out = []
    for w in value:
        m = _WINDOW.match(w) if isinstance(w, str) else None
        if m is None:
            raise ConfigError(f"{source}: window {w!r} is not HH:MM-HH:MM with hours 00-24 and minutes 00-59")
        start = int(m[1]) * 60 + int(m[2])
        end = int(m[3]) * 60 + int(m[4])
        if end > 24 * 60:
            raise ConfigError(f"{source}: window {w!r} ends after 24:00")
        if start == end:
            raise ConfigError(f"{source}: window {w!r} is empty (it starts where it ends)")
        out.append((start, end))
    return tuple(out)


def in_windows(windows: Sequence[tuple[int, int]], now: dt.datetime) -> bool:
    """Whether local time ``now`` falls in one of ``windows`` (each may wrap past midnight)."""
    minute = now.hour * 60 + now.minute
    for start, end in windows:
        if (start < end and start <= minute < end) or (start > end and (minute >= start or minute < end)):
            return True
    return False


def verdict(policy: Policy, readings: Readings, *, now: dt.datetime, rounds_today: int) -> Verdict:
    """May the device train now? ``now`` is local time; ``rounds_today`` counts this local day."""
    unsafe: list[str] = []
    busy: list[str] = []
    notes: list[str] = []
    deny_unknown = policy.unknown == "deny"

    def unknown(what: str) -> None:
        (unsafe if deny_unknown else notes).append(f"{what} unknown")

    if policy.require_ac:
        if readings.on_ac is None:
            unknown("power source")
        elif not readings.on_ac:
            unsafe.append("not on AC power")
    if policy.min_battery_percent is not None:
        b = readings.battery_percent
        if b is None:
            # No battery at all is a mains-powered machine; say so, do not refuse.
            notes.append("no battery")
        elif b < policy.min_battery_percent:
            unsafe.append(f"battery {b:.0f}% < {policy.min_battery_percent:g}%")
    if policy.max_cpu_load is not None:
        load = readings.cpu_load
        if load is None:
            unknown("cpu load")
        elif load > policy.max_cpu_load:
            busy.append(f"cpu load {load:.2f} > {policy.max_cpu_load:g}")
    _at_least(policy.min_memory_mb, readings.memory_available_mb, "memory available", "MB", unsafe, unknown)
    _at_least(policy.min_disk_mb, readings.disk_free_mb, "disk free", "MB", unsafe, unknown)
    if policy.max_temperature_c is not None:
        t = readings.temperature_c
        if t is None:
            unknown("temperature")
        elif t > policy.max_temperature_c:
            unsafe.append(f"temperature {t:.1f} C > {policy.max_temperature_c:g} C")
    if policy.windows and not in_windows(policy.windows, now):
        unsafe.append(f"outside the training windows ({_format_windows(policy.windows)}) at {now:%H:%M}")
    if policy.max_rounds_per_day is not None and rounds_today >= policy.max_rounds_per_day:
        unsafe.append(f"{rounds_today} rounds today reached max_rounds_per_day {policy.max_rounds_per_day}")
    reasons = tuple(unsafe + busy)
    return Verdict(ok=not reasons, reasons=reasons, pause=bool(busy) and not unsafe, notes=tuple(notes))


def _at_least(minimum: float | None, value: float | None, what: str, unit: str, unsafe: list[str],
              unknown: Any) -> None:
    if minimum is None:
        return
    if value is None:
        unknown(what)
    elif value < minimum:
        unsafe.append(f"{what} {value:.0f} {unit} < {minimum:g} {unit}")


def _format_windows(windows: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}" for s, e in windows)

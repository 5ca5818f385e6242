"""What a device can afford right now: CPU load, memory, power, temperature, disk.

:class:`Monitor` reads Linux's own accounting files, from a configurable
root so tests can hand it a fake tree:

- CPU load: busy time over all cores from ``proc/stat`` between two
  readings, minus the CPU time this agent and its training children spent
  in the same interval (``/proc/self/stat`` fields, via :func:`os.times`), as
  a fraction of the machine's capacity. So the agent's own training never
  makes the device look busy to its own policy.
- memory: ``MemAvailable`` from ``proc/meminfo``.
- power: every ``sys/class/power_supply/*``: batteries' ``capacity`` and
  ``status``, and whether any ``Mains``/``USB`` supply is ``online``.
- temperature: the hottest ``sys/class/thermal/thermal_zone*/temp``
  (millidegrees Celsius).
- disk: free bytes on the state directory's file system (``statvfs``).

A value the machine does not have (no battery, no thermal zone) or cannot
read is ``None``: unknown, never a crash; the policy decides what unknown
means. Reading everything takes a few hundred microseconds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Monitor", "Readings"]

logger = logging.getLogger(__name__)

# Sensible bounds: a thermal zone outside them is a broken sensor, not a reading.
_MIN_C, _MAX_C = -40.0, 150.0


@dataclass(frozen=True)
class Readings:
    """One reading of the device. ``None`` means unknown (no such sensor, or unreadable).

    Attributes:
        cpu_load: the fraction of all cores busy with other work since the
            last reading, in [0, 1] (``None`` on the first reading).
        memory_available_mb: memory available to new work, MiB.
        battery_percent: the lowest battery's charge, 0-100 (``None``: no battery).
        on_ac: whether a mains or USB supply is online (``None``: no supply
            is described; a desktop or server usually).
        temperature_c: the hottest thermal zone, degrees Celsius.
        disk_free_mb: free space where the agent keeps its state, MiB.
        cores: logical cores.
    """

    cpu_load: float | None
    memory_available_mb: float | None
    battery_percent: float | None
    on_ac: bool | None
    temperature_c: float | None
    disk_free_mb: float | None
    cores: int

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class Monitor:
    """Reads :class:`Readings` from ``root`` (``/`` on a real device).

    Args:
        root: where ``proc`` and ``sys`` are (a fake tree in tests).
        disk_path: the file system whose free space counts (the state directory).
        own_cpu_s: the CPU seconds this agent and its children have used so far;
            by default from :func:`os.times` (tests pass their own).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        disk_path: Path | None = None,
        own_cpu_s: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.disk_path = disk_path
        self._own_cpu_s = own_cpu_s or _own_cpu_seconds
        self._clock = clock
        self._cores = _cores(root)
        self._last: tuple[float, float, float] | None = None  # (busy_s, own_s, at)
        self._warned: set[str] = set()

    def read(self) -> Readings:
        """Take one reading; never raises on a missing or malformed file."""
        return Readings(
            cpu_load=self._cpu_load(),
            memory_available_mb=self._guard("memory", self._memory_available_mb),
            battery_percent=self._guard("battery", self._battery_percent),
            on_ac=self._guard("power", self._on_ac),
            temperature_c=self._guard("thermal", self._temperature_c),
            disk_free_mb=self._guard("disk", self._disk_free_mb),
            cores=self._cores,
        )

    # ------------------------------------------------------------------ parts

    def _guard(self, what: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except (OSError, ValueError, IndexError) as e:
            if what not in self._warned:  # once per sensor, not on every check-in
                self._warned.add(what)
                logger.warning("cannot read the %s sensor (%s); treating it as unknown", what, e)
            return None

    def _cpu_load(self) -> float | None:
        try:
            busy = _busy_seconds(self.root / "proc" / "stat")
        except (OSError, ValueError, IndexError) as e:
            if "cpu" not in self._warned:
                self._warned.add("cpu")
                logger.warning("cannot read CPU time (%s); treating the load as unknown", e)
            return None
        own, now = self._own_cpu_s(), self._clock()
        last, self._last = self._last, (busy, own, now)
        if last is None or now <= last[2]:
            return None
        others = (busy - last[0]) - (own - last[1])
        return min(1.0, max(0.0, others / ((now - last[2]) * self._cores)))

    def _memory_available_mb(self) -> float | None:
        for line in (self.root / "proc" / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0  # kB
        return None

    def _supplies(self) -> list[Path]:
        base = self.root / "sys" / "class" / "power_supply"
        return sorted(base.iterdir()) if base.is_dir() else []

    def _battery_percent(self) -> float | None:
        levels = []
        for supply in self._supplies():
            if _read(supply / "type") == "Battery" and (supply / "capacity").exists():
                if _read(supply / "present") == "0":
                    continue
                levels.append(min(100.0, max(0.0, float(_read(supply / "capacity")))))
        return min(levels) if levels else None

    def _on_ac(self) -> bool | None:
        mains = [s for s in self._supplies() if _read(s / "type") in {"Mains", "USB", "USB_C", "USB_PD"}]
        if mains:
            return any(_read(s / "online") == "1" for s in mains)
        batteries = [s for s in self._supplies() if _read(s / "type") == "Battery"]
        if batteries:  # no adapter described: a charging or full battery means external power
            return any(_read(s / "status") in {"Charging", "Full", "Not charging"} for s in batteries)
        return None

    def _temperature_c(self) -> float | None:
        base = self.root / "sys" / "class" / "thermal"
        temps = []
        for zone in sorted(base.glob("thermal_zone*")) if base.is_dir() else []:
            try:
                c = int(_read(zone / "temp")) / 1000.0
            except (OSError, ValueError):
                continue  # one broken zone (common on boards) does not hide the others
            if _MIN_C <= c <= _MAX_C:
                temps.append(c)
        return max(temps) if temps else None

    def _disk_free_mb(self) -> float | None:
        if self.disk_path is None:
            return None
        st = os.statvfs(self.disk_path)
        return st.f_bavail * st.f_frsize / (1024.0 * 1024.0)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _busy_seconds(stat: Path) -> float:
    """Non-idle CPU seconds over all cores since boot, from the ``cpu`` line of ``/proc/stat``."""
    with stat.open() as f:
        fields = f.readline().split()
    if fields[0] != "cpu":
        raise ValueError(f"{stat} does not start with the cpu line")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    del idle, iowait
    return (user + nice + system + irq + softirq + steal) / _clock_ticks()


def _clock_ticks() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _cores(root: Path) -> int:
    if root == Path("/"):
        return os.cpu_count() or 1
    try:  # a fake tree: count the per-core lines of its proc/stat
        lines = (root / "proc" / "stat").read_text().splitlines()
        return max(1, sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit()))
    except OSError:
        return 1

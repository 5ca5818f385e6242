"""``fedge device status``: what the agent would see and decide on this device right now.

What an operator runs over SSH to learn why a device is (not) training: the
monitor's readings, the capability profile the agent last measured, the
policy's verdict with its reasons, the limits, and the daily round count.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from fedge.agent.config import AgentConfig
from fedge.agent.monitor import Monitor
from fedge.agent.policy import verdict
from fedge.agent.profile import ProfileCache
from fedge.agent.state import RoundsToday
from fedge.agent.trainer import cgroup_memory_limit_mb

__all__ = ["device_status", "format_status"]

# CPU load needs an interval; half a second is long enough to mean something.
_INTERVAL_S = 0.5


def device_status(config: AgentConfig, *, interval_s: float = _INTERVAL_S) -> dict[str, Any]:
    """Readings, profile, verdict and limits for ``config``'s device (no state is changed)."""
    # The state directory's file system, or the nearest folder above it that exists yet.
    disk = next((p for p in (config.state_dir, *config.state_dir.parents) if p.exists()), None)
    monitor = Monitor(disk_path=disk)
    monitor.read()
    time.sleep(interval_s)
    readings = monitor.read()
    rounds = RoundsToday(config.state_dir).count() if config.state_dir.exists() else 0
    v = verdict(config.policy, readings, now=dt.datetime.now(), rounds_today=rounds)
    profile = ProfileCache(config.state_dir).profile if config.state_dir.exists() else None
    limits = {k: v for k, v in vars(config.limits).items() if v is not None}
    return {
        "readings": readings.to_json(),
        "profile": profile.to_json() if profile is not None else None,
        "verdict": v.to_json(),
        "rounds_today": rounds,
        "limits": limits,
        "cgroup_memory_limit_mb": cgroup_memory_limit_mb(),
    }


def format_status(status: dict[str, Any]) -> str:
    """The status as aligned text lines for a terminal."""
    lines = []
    v = status["verdict"]
    lines.append("training: " + ("allowed" if v["ok"] else "not now: " + "; ".join(v["reasons"])))
    lines += [f"  note: {n}" for n in v["notes"]]
    lines.append(f"rounds today: {status['rounds_today']}")
    lines.append("readings:")
    labels = {"cpu_load": "cpu load (others)", "memory_available_mb": "memory available (MB)",
              "battery_percent": "battery (%)", "on_ac": "on AC power", "temperature_c": "temperature (C)",
              "disk_free_mb": "disk free (MB)", "cores": "cores"}
    for key, label in labels.items():
        value = status["readings"].get(key)
        lines.append(f"  {label:<24} {'unknown' if value is None else value}")
    profile = status["profile"]
    if profile is not None:
        lines.append("profile:")
        for key in ("arch", "cores", "memory_mb", "accelerators", "examples_per_s", "task"):
            value = profile.get(key)
            if key == "accelerators":
                value = ", ".join(value) or "none"
            lines.append(f"  {key:<24} {'not measured yet' if value is None else value}")
    lines.append("limits: " + (", ".join(f"{k}={v}" for k, v in status["limits"].items()) or "none"))
    cap = status["cgroup_memory_limit_mb"]
    lines.append(f"cgroup memory limit: {'none' if cap is None else f'{cap:.0f} MB'}")
    return "\n".join(lines)

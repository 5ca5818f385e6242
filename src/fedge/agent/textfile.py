"""The agent's own metrics as a Prometheus node-exporter textfile (``metrics_file`` in agent.toml).

Node exporter's textfile collector reads ``*.prom`` files from a folder; the
agent rewrites its file after every check-in, atomically (a temporary file
renamed over the old one, as the collector requires). No port is opened on
the device: the node exporter already running there exports the figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["write_textfile"]

_HELP = {
    "fedge_agent_policy_ok": "1 when the training policy allows training now",
    "fedge_agent_rounds_today": "Rounds this device trained today (local day)",
    "fedge_agent_cpu_load": "CPU load of other work, fraction of all cores",
    "fedge_agent_memory_available_bytes": "Memory available to new work",
    "fedge_agent_battery_percent": "Battery charge",
    "fedge_agent_on_ac": "1 on mains or USB power",
    "fedge_agent_temperature_celsius": "Hottest thermal zone",
    "fedge_agent_disk_free_bytes": "Free space where the agent keeps its state",
    "fedge_agent_cpu_seconds_total": "CPU time of the agent itself, training excluded",
    "fedge_agent_resident_memory_bytes": "Resident memory of the agent",
    "fedge_agent_examples_per_second": "Training throughput measured by the capability benchmark",
    "fedge_agent_events_queued": "Device events waiting to be sent",
    "fedge_agent_wire_bytes_total": "Bytes the agent's sockets sent (up) and received (down), TLS included",
}


def write_textfile(path: Path, values: Mapping[str, float | None]) -> None:
    """Write ``values`` (metric name -> value; ``None`` skipped) to ``path`` atomically.

    A name may carry labels (``fedge_agent_wire_bytes_total{direction="up"}``);
    the samples of one metric must be adjacent in ``values``, and its HELP and
    TYPE lines are written once, before the first.

    Raises:
        OSError: the folder cannot be written.
    """
    lines = []
    described = set()
    for sample, value in values.items():
        if value is None:
            continue
        name = sample.split("{", 1)[0]
        if name not in described:
            described.add(name)
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {_HELP.get(name, name)}", f"# TYPE {name} {kind}"]
        lines.append(f"{sample} {float(value)!r}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)

"""Shared helpers for the bench scripts: machine description, timing a CLI run."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FEDGE = str(Path(sys.executable).with_name("fedge"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def run_cli(args: list[str]) -> dict[str, Any]:
    """Run ``fedge ARGS --out TMP --quiet`` as a user would; wall time, peak RSS, summary."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [FEDGE, *args, "--out", tmp, "--quiet"], capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"fedge {' '.join(args)} failed:\n{proc.stderr}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "peak_rss_mb_children_max": peak_kib / 1024, "summary": summary}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

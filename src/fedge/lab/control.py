"""``fedge lab status`` and ``fedge lab down``: the labs that are up, and taking them down.

A lab that is up has a folder ``/run/fedge-lab/NAME/`` holding its state file
(every resource it made, :mod:`fedge.lab.host`) and, while ``fedge lab run``
runs, ``run.json``: the run's process id, its output folder and its latest
progress line. ``down`` first asks a live run to stop (SIGTERM: the run tears
down what it made and writes its report), waits for it, then removes whatever
the state file still lists, so a lab whose runner was killed outright is
cleaned up just the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError
from fedge.lab.host import LAB_ROOT, LabError, LabState, state_path, teardown, validate_lab_name
from fedge.store import atomic_write

__all__ = ["STATE_ROOT", "forget", "format_status", "lab_down", "lab_status", "state_path", "write_run_info"]

#: Where labs that are up keep their state: ``STATE_ROOT/NAME/state.json`` (and ``run.json``).
STATE_ROOT = LAB_ROOT

_RUN_FILE = "run.json"
_STOP_WAIT_S = 120.0


def write_run_info(name: str, *, out_dir: Path, spec: Path, line: str) -> None:
    """Record (atomically) the running lab's process, output folder and latest progress line."""
    folder = STATE_ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "started": _start_time(os.getpid()), "out_dir": str(out_dir),
            "spec": str(spec), "line": line, "updated_unix": time.time()}
    atomic_write(folder / _RUN_FILE, (json.dumps(info) + "\n").encode())


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _run_info(name: str) -> dict[str, Any] | None:
    try:
        info = json.loads((STATE_ROOT / name / _RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _alive(info: dict[str, Any] | None) -> bool:
    """The run that wrote ``info`` still runs (same pid and same start time: not a recycled pid)."""
    if info is None or not isinstance(info.get("pid"), int):
        return False
    return info.get("started") is not None and _start_time(int(info["pid"])) == info["started"]


def lab_status() -> list[dict[str, Any]]:
    """Every lab with a folder under ``/run/fedge-lab``: its resources and its run, if one is going."""
    labs: list[dict[str, Any]] = []
    if not STATE_ROOT.is_dir():
        return labs
    for folder in sorted(p for p in STATE_ROOT.iterdir() if p.is_dir()):
        name = folder.name
        info = _run_info(name)
        try:
            resources = LabState.load(state_path(name)).resources() if state_path(name).exists() else []
        except (LabError, ConfigError) as e:  # ConfigError: a folder whose name no lab can have
            labs.append({"name": name, "error": str(e)})
            continue
        kinds: dict[str, int] = {}
        for r in resources:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        labs.append({
            "name": name, "running": _alive(info), "resources": kinds,
            "out_dir": None if info is None else info.get("out_dir"),
            "spec": None if info is None else info.get("spec"),
            "progress": None if info is None else info.get("line"),
            "updated_unix": None if info is None else info.get("updated_unix"),
        })
    return labs


def format_status(labs: list[dict[str, Any]]) -> str:
    """``fedge lab status``'s text: one block per lab."""
    if not labs:
        return "no lab is up"
    lines = []
    for lab in labs:
        if "error" in lab:
            lines.append(f"{lab['name']}: unreadable state: {lab['error']}")
            continue
        what = ", ".join(f"{n} {k}" for k, n in sorted(lab["resources"].items())) or "nothing"
        state = "running" if lab["running"] else "not running (run `fedge lab down` to clean up)"
        lines.append(f"{lab['name']}: {state}; holds {what}")
        if lab["progress"]:
            age = time.time() - float(lab["updated_unix"] or 0)
            lines.append(f"  {lab['progress']} ({age:.0f} s ago)")
        if lab["out_dir"]:
            lines.append(f"  output: {lab['out_dir']}")
    return "\n".join(lines)


def lab_down(name: str | None, *, progress: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Stop the lab ``name`` (every lab when None) and remove all it made.

    Returns:
        What could not be removed, one line each (empty: the lab is gone).
    """
    if name is not None:
        validate_lab_name(name)
        names = [name]
        if not (STATE_ROOT / name).is_dir():
            raise LabError(f"no lab named {name!r} is up (nothing under {STATE_ROOT / name})")
    else:
        folders = sorted(p.name for p in STATE_ROOT.iterdir() if p.is_dir()) if STATE_ROOT.is_dir() else []
        names = []
        for folder in folders:
            try:
                names.append(validate_lab_name(folder))
            except ConfigError:
                progress(f"{STATE_ROOT / folder}: not a lab's folder; left alone")
        if not names:
            progress("no lab is up")
    failures: list[str] = []
    for lab in names:
        failed: list[str] = []
        info = _run_info(lab)
        if _alive(info):
            assert info is not None
            progress(f"{lab}: stopping its run (pid {info['pid']}), which tears down what it made")
            os.kill(int(info["pid"]), signal.SIGTERM)
            deadline = time.monotonic() + _STOP_WAIT_S
            while _alive(info) and time.monotonic() < deadline:
                time.sleep(0.5)
        if state_path(lab).exists():
            result = teardown(LabState.load(state_path(lab)))
            progress(f"{lab}: removed {len(result.removed)} resources")
            failed = [f"{lab}: {f}" for f in result.failures]
        if not failed:
            forget(lab)
        failures += failed
    return failures


def forget(name: str) -> None:
    """Remove the lab's folder once its resources are gone (run.json, empty mount points)."""
    folder = STATE_ROOT / name
    (folder / _RUN_FILE).unlink(missing_ok=True)
    _rmdir_tree(folder)


def _rmdir_tree(folder: Path) -> None:
    """Remove empty folders bottom-up (a mount point still mounted is not empty and stays)."""
    if not folder.is_dir():
        return
    for child in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir():
            try:
                child.rmdir()
            except OSError:
                continue
    with contextlib.suppress(OSError):
        folder.rmdir()

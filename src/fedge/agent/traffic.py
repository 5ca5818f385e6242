"""The agent's wire counts kept in ``<state_dir>/wire.json``, for ``fedge lab`` and operators.

The agent's :class:`~fedge.transport.meter.WireMeter` counts the bytes its
sockets moved; :class:`WireRecorder` writes the totals to ``wire.json`` as
``{"sent": N, "received": N, "connections": K, "updated_unix": t}``,
atomically (a temporary file renamed over the old one), at most once a second
while the counts move and once more when the agent stops. A restarted agent
counts on from the file's totals, so they cover every run on this state
directory; an agent killed with ``kill -9`` loses only what it counted since
the last write, about one second of traffic at most.

The file is 0644: it holds no secret, and ``fedge lab`` reads it as root from
the host, where the state directory is a volume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedge.transport.meter import WireCounts, WireMeter

__all__ = ["WIRE_FILE", "WireRecorder", "load_wire_counts", "write_wire_counts"]

logger = logging.getLogger(__name__)

WIRE_FILE = "wire.json"


def load_wire_counts(path: Path) -> WireCounts:
    """The totals kept in ``path``; zeros when there is no file yet, or (with a warning) a bad one.

    A malformed file does not stop the agent: the counts are a measurement,
    not state the federation depends on; the warning says they restart at zero.
    """
    from fedge.transport.meter import WireCounts

    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        return WireCounts(
            sent=kept["sent"], received=kept["received"], connections=kept["connections"]
        )
    except FileNotFoundError:
        return WireCounts()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: unusable wire counts (%s); counting from zero", path, e)
        return WireCounts()


def write_wire_counts(path: Path, counts: WireCounts, *, now_unix: float) -> None:
    """Write ``counts`` to ``path`` atomically, mode 0644.

    Not fsynced: the file must survive the agent being killed, which the
    page cache does, not a power cut; an fsync a second would wear an SD card.

    Raises:
        OSError: the file cannot be written (a full disk, a missing folder).
    """
    data = json.dumps({
        "sent": counts.sent, "received": counts.received, "connections": counts.connections,
        "updated_unix": round(now_unix, 3),
    }) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class WireRecorder:
    """Keeps ``wire.json`` up to date with a meter, from a background thread.

    Use it as a context manager around the agent's run: entering adds the
    file's totals to the meter (a restart counts on) and starts the thread;
    leaving writes the final totals.

    Args:
        meter: the agent's meter.
        path: the file (``<state_dir>/wire.json``).
        every_s: the shortest time between two writes (> 0).
        clock: wall-clock seconds, for ``updated_unix``.

    Raises:
        ValueError: ``every_s`` is not a positive finite number.
    """

    def __init__(
        self, meter: WireMeter, path: Path, *, every_s: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        if not (math.isfinite(every_s) and every_s > 0):
            raise ValueError(f"every_s must be a positive finite number, got {every_s}")
        self._meter = meter
        self.path = path
        self._every_s = every_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: WireCounts | None = None
        self._failing = False

    def __enter__(self) -> WireRecorder:
        self._meter.carry_over(load_wire_counts(self.path))
        self._thread = threading.Thread(target=self._run, name="fedge-wire-recorder", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.write()

    def write(self) -> None:
        """Write the meter's totals now if they changed since the last write; never raises OSError.

        A failure (a full disk is one of the lab's faults) is logged once
        until a write succeeds again, and retried at the next write.
        """
        counts = self._meter.counts()
        if counts == self._written:
            return
        try:
            write_wire_counts(self.path, counts, now_unix=self._clock())
        except OSError as e:
            if not self._failing:
                logger.warning("cannot write the wire counts to %s (%s); retrying", self.path, e)
            self._failing = True
            return
        if self._failing:
            logger.info("wire counts written to %s again", self.path)
        self._failing = False
        self._written = counts

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.write()

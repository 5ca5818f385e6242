"""Device events: what an operator should see without SSH-ing into the device.

The agent's own log is the source: :class:`EventHandler` sits on the
``fedge.agent`` logger and turns into events

- records logged with ``extra={"event": KIND}`` (policy changes, training
  stopped, enrolment, renewal, start), at any level;
- every warning and error, with a short stack summary (the exception's type
  and message and its last three frames) when one is attached.

:class:`EventLog` keeps them in a bounded queue (the oldest are dropped
first, and a ``dropped`` event says how many) until the loop sends them to
the coordinator in batches (``POST /v1/events``) after a check-in. The
coordinator rate-limits each device; a refused or failed batch goes back to
the front of the queue and is sent later. Log lines never hold params,
updates, keys or tokens, so neither do events.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["EventHandler", "EventLog"]

_MAX_MESSAGE = 500
_FRAMES = 3
_KINDS = frozenset({"policy", "abort", "error", "warning", "enrolment", "renewal", "start", "stop"})


class EventLog:
    """A bounded, thread-safe queue of events waiting to be sent.

    Args:
        capacity: the most events kept; beyond it the oldest are dropped and counted.
        clock: wall-clock seconds (the events' ``at``).
    """

    def __init__(self, capacity: int = 500, *, clock: Callable[[], float] = time.time) -> None:
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, kind: str, message: str, *, level: str = "info",
            **fields: str | int | float | bool) -> None:
        event = {"at": self._clock(), "kind": kind, "level": level,
                 "message": message[:_MAX_MESSAGE] or "(no message)",
                 "fields": dict(list(fields.items())[:16])}
        with self._lock:
            self._queue.append(event)
            while len(self._queue) > self._capacity:
                self._queue.popleft()
                self.dropped += 1

    def take(self, n: int = 50) -> list[dict[str, Any]]:
        """Up to ``n`` events, oldest first (a ``dropped`` note first if events were lost)."""
        with self._lock:
            batch = []
            if self.dropped:
                batch.append({"at": self._clock(), "kind": "dropped", "level": "warning",
                              "message": f"{self.dropped} older events were dropped (the queue was full)",
                              "fields": {"count": self.dropped}})
                self.dropped = 0
            while self._queue and len(batch) < n:
                batch.append(self._queue.popleft())
            return batch

    def put_back(self, batch: list[dict[str, Any]]) -> None:
        """Return an unsent batch to the front of the queue (still bounded)."""
        with self._lock:
            for event in reversed(batch):
                if event["kind"] == "dropped":
                    self.dropped += int(event["fields"]["count"])
                else:
                    self._queue.appendleft(event)
            while len(self._queue) > self._capacity:
                self._queue.pop()
                self.dropped += 1


class EventHandler(logging.Handler):
    """Feeds :class:`EventLog` from the agent's log records (see the module docstring)."""

    def __init__(self, log: EventLog) -> None:
        super().__init__(level=logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = getattr(record, "event", None)
            if kind not in _KINDS:
                if record.levelno < logging.WARNING:
                    return
                kind = "error" if record.levelno >= logging.ERROR else "warning"
            level = "error" if record.levelno >= logging.ERROR else (
                "warning" if record.levelno >= logging.WARNING else "info")
            fields: dict[str, str | int | float | bool] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                frames = traceback.extract_tb(exc.__traceback__)[-_FRAMES:]
                fields["exception"] = f"{type(exc).__name__}: {exc}"[:200]
                fields["where"] = " < ".join(f"{f.name}:{f.lineno}" for f in reversed(frames))[:200]
            self.log.add(str(kind), record.getMessage(), level=level, **fields)
        except Exception:  # a logging handler must never raise into the code that logs
            self.handleError(record)

"""Log output for fedge's commands: human ``console`` lines or ``json`` lines.

Only the CLI calls :func:`configure`; library code just logs (``logging.getLogger(__name__)``)
and may attach structured fields with ``extra={"round": 3, "device": "gw-1"}``.

A JSON line holds ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger``, ``message``, every structured field, and ``error`` (the exception
type and message, plus the last frames as ``file:line function``) when one is
attached. It is one object per line, as journald (through stdout/stderr),
Fluentd's ``json`` parser and rsyslog's ``mmjsonparse`` take it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any, TextIO

__all__ = ["FORMATS", "JsonFormatter", "configure"]

FORMATS = ("console", "json")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_FRAMES = 3


class JsonFormatter(logging.Formatter):
    """One JSON object per record; non-JSON field values are written with ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = traceback.extract_tb(exc.__traceback__)[-_FRAMES:]
            out["error"] = {
                "type": type(exc).__name__,
                "message": str(exc),
                "where": [f"{f.filename}:{f.lineno} {f.name}" for f in frames],
            }
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(*, fmt: str, level: int, service: bool, stream: TextIO | None = None) -> None:
    """Send fedge's log records to ``stream`` (stderr) in format ``fmt``.

    ``service`` picks the console layout: long-running services get time and
    origin on every line; one-shot commands print ``fedge: LEVEL: message``.

    Raises:
        ValueError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif service:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("fedge: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request at INFO: noise in a service's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)

"""JSON log lines: the fields journald/Fluentd users query, structured extras, errors summarized."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from fedge.logs import JsonFormatter, configure


def _record(msg: str, *args: object, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("fedge.test", logging.WARNING, __file__, 10, msg, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_line_has_time_level_logger_message_and_extras() -> None:
    line = JsonFormatter().format(_record("round %d open", 3, round=3, device="gw-1"))
    out = json.loads(line)
    assert out["level"] == "warning" and out["logger"] == "fedge.test"
    assert out["message"] == "round 3 open"
    assert out["round"] == 3 and out["device"] == "gw-1"
    assert out["time"].endswith("Z") and "T" in out["time"]
    assert "\n" not in line


def test_json_line_summarizes_an_exception_without_a_multiline_traceback() -> None:
    try:
        raise RuntimeError("disk full")
    except RuntimeError as e:
        line = JsonFormatter().format(_record("checkpoint failed", exc=e))
    out = json.loads(line)
    assert out["error"]["type"] == "RuntimeError" and out["error"]["message"] == "disk full"
    assert out["error"]["where"] and "test_logs.py" in out["error"]["where"][-1]
    assert "\n" not in line


def test_values_json_cannot_encode_are_written_as_text() -> None:
    out = json.loads(JsonFormatter().format(_record("x", path=object())))
    assert out["path"].startswith("<object")


def test_configure_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="console, json"):
        configure(fmt="xml", level=logging.INFO, service=True)


def test_configure_json_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure(fmt="json", level=logging.INFO, service=True, stream=stream)
        logging.getLogger("fedge.x").info("hello %s", "there", extra={"round": 1})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert json.loads(stream.getvalue())["message"] == "hello there"


def _fedge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    code = "import sys; from fedge.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60, check=False)


def test_cli_refuses_a_bad_log_format_from_the_environment() -> None:
    result = _fedge("healthcheck", "agent", "--state-dir", "/nonexistent", env={"FEDGE_LOG_FORMAT": "xml"})
    assert result.returncode == 2
    assert "FEDGE_LOG_FORMAT must be one of console, json" in result.stderr


def test_cli_refuses_a_bad_log_format_flag() -> None:
    result = _fedge("agent", "--log-format", "yaml")
    assert result.returncode == 2 and "invalid choice" in result.stderr

"""The agent's configuration: one frozen value, from a TOML file and command-line overrides.

A config file is flat TOML::

    coordinator = "https://coordinator.example:8443"
    data = "data/local.npz"          # .npz or .csv; relative to this file
    state_dir = "/var/lib/fedge"     # device id and the lock; relative to this file
    # device_id = "gateway-07"       # default: generated once, kept in state_dir
    # backoff_base_s = 0.5
    # backoff_cap_s = 30.0
    # request_timeout_s = 60.0
    # max_payload_bytes = 268435456
    # log_level = "info"
    ca_cert = "ca.crt"               # the fedge CA; or ca_fingerprint = "sha256 hex"
    token_file = "enrol.token"       # or token = "..."; only until the device is enrolled
    # insecure = false               # true accepts a plain http:// coordinator

    [policy]                         # when training may run (fedge.agent.policy)
    require_ac = true
    max_cpu_load = 0.5

    [limits]                         # what training may use (fedge.agent.trainer)
    nice = 10
    memory_mb = 1024

Precedence is defaults < file < overrides (command-line flags). Relative
paths in the file are resolved against the file's directory, so a config
file means the same thing whatever directory the agent starts in; relative
paths given as overrides are resolved against the working directory. Every
refusal is a :class:`~fedge.errors.ConfigError` whose one line names where the
value came from (the file and its key, or the flag) and what was wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedge.agent.policy import Policy, parse_policy
from fedge.agent.trainer import Limits, parse_limits
from fedge.errors import ConfigError
from fedge.wire import DEVICE_ID_PATTERN

__all__ = ["LOG_LEVELS", "AgentConfig", "load_agent_config"]

#: Log levels the agent accepts (``cli.py`` configures the handlers with it).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
_REQUIRED = ("coordinator", "data", "state_dir")
_PATH_KEYS = ("data", "state_dir", "ca_cert", "token_file")


class _InvalidError(Exception):
    """A value failed its check; the message completes "KEY ..." ("must be ...")."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything a device agent needs to run.

    Attributes:
        coordinator: the coordinator's base URL, ``http://`` or ``https://``
            (a trailing ``/`` is dropped).
        data: the device's local data, a ``.npz`` or ``.csv`` file.
        state_dir: where the agent keeps its device id and its lock file
            (created if missing).
        device_id: this device's identity; ``None`` means one generated on the
            first run as ``dev-`` and 12 hex digits and kept in
            ``state_dir/device_id``.
        backoff_base_s: the first retry delay bound after a failure; it doubles
            with each failure in a row.
        backoff_cap_s: the largest retry delay bound.
        request_timeout_s: the bound on connecting and on each read or write
            of one request.
        max_payload_bytes: the largest params payload accepted, compressed or not.
        log_level: one of :data:`LOG_LEVELS`.
        ca_cert: the fedge CA certificate the operator gave the device; the
            coordinator's TLS certificate must chain to it.
        ca_fingerprint: instead of ``ca_cert``, the CA certificate's SHA-256
            fingerprint (``fedge ca init`` prints it): the CA is fetched from
            the coordinator and kept only if it matches.
        token: the one-time enrolment token (``fedge token create``); needed
            until the device holds a certificate.
        token_file: a file holding the token instead (keeps it out of
            process listings and shell history).
        insecure: accept a plain ``http://`` coordinator (no TLS, no device
            authentication; loopback testing only).
        policy: when training may run (the ``[policy]`` table).
        limits: what training may use (the ``[limits]`` table).

    Raises:
        ConfigError: a value has the wrong type or is out of range, naming the field.
    """

    coordinator: str
    data: Path
    state_dir: Path
    device_id: str | None = None
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    request_timeout_s: float = 60.0
    max_payload_bytes: int = _DEFAULT_MAX_PAYLOAD_BYTES
    log_level: str = "info"
    ca_cert: Path | None = None
    ca_fingerprint: str | None = None
    token: str | None = None
    token_file: Path | None = None
    insecure: bool = False
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                value = _CHECKS[f.name](getattr(self, f.name))
            except _InvalidError as e:
                raise ConfigError(f"AgentConfig.{f.name} {e}") from None
            object.__setattr__(self, f.name, value)
        if self.backoff_cap_s < self.backoff_base_s:
            raise ConfigError(
                f"AgentConfig.backoff_cap_s ({self.backoff_cap_s}) must be at least "
                f"backoff_base_s ({self.backoff_base_s})"
            )
        plain = self.coordinator.lower().startswith("http://")
        if plain and not self.insecure:
            raise ConfigError(
                f"coordinator {self.coordinator} is plain HTTP: pass --insecure (insecure = true) to accept "
                "an unauthenticated, unencrypted link, or use the coordinator's https:// URL"
            )
        if not plain and self.insecure:
            raise ConfigError("insecure applies to http:// coordinators only; this one is https://")
        if self.token is not None and self.token_file is not None:
            raise ConfigError("give the enrolment token as token or token_file, not both")


def load_agent_config(path: str | Path | None, overrides: Mapping[str, object]) -> AgentConfig:
    """Read an agent config file and apply overrides on top of it.

    Args:
        path: the TOML file, or ``None`` for none (then ``overrides`` must
            give every required key).
        overrides: values from command-line flags, keyed by field name
            (``-`` or ``_``: ``state-dir`` is ``state_dir``); a ``None`` value
            means "not given" and is skipped. Keys: ``coordinator``, ``data``,
            ``state_dir``, ``device_id``, ``backoff_base_s``, ``backoff_cap_s``,
            ``request_timeout_s``, ``max_payload_bytes``, ``log_level``.

    Returns:
        The checked config, paths resolved.

    Raises:
        ConfigError: the file is missing, unreadable or not TOML; a key is
            unknown, has the wrong type or value, or a required one
            (``coordinator``, ``data``, ``state_dir``) is missing. The message
            is one line naming the file and key, or the flag.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        source = str(path)
        base = Path(path).parent
        for key, value in _read_toml(Path(path)).items():
            if key not in _CHECKS:
                raise ConfigError(f"{source}: unknown key {key!r}; {_suggest(key)}")
            where[key] = f"{source}: key {key!r}"
            values[key] = _check(key, value, where[key])
            if key in _PATH_KEYS:
                values[key] = base / values[key]
    for raw_key, value in overrides.items():
        key = raw_key.replace("-", "_")
        if key not in _CHECKS:
            raise ConfigError(f"unknown override {raw_key!r}; {_suggest(key)}")
        if value is None:
            continue
        where[key] = "--" + key.replace("_", "-")
        values[key] = _check(key, value, where[key])
    for key in _REQUIRED:
        if key not in values:
            flag = "--" + key.replace("_", "-")
            if path is None:
                raise ConfigError(f"missing required setting {key!r}: give {flag} or a config file")
            raise ConfigError(f"{path}: missing required key {key!r} (or give {flag})")
    base_s = values.get("backoff_base_s", AgentConfig.backoff_base_s)
    cap_s = values.get("backoff_cap_s", AgentConfig.backoff_cap_s)
    if cap_s < base_s:
        who = where.get("backoff_cap_s") or where["backoff_base_s"]
        raise ConfigError(f"{who}: backoff_cap_s ({cap_s}) must be at least backoff_base_s ({base_s})")
    return AgentConfig(**values)


# ------------------------------------------------------------------ checks


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _CHECKS, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(_CHECKS)}"


def _check(key: str, value: object, label: str) -> object:
    try:
        return _CHECKS[key](value)
    except _InvalidError as e:
        raise ConfigError(f"{label} {e}") from None


def _url(value: object) -> str:
    if not isinstance(value, str):
        raise _InvalidError(f"must be a URL string, got {value!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is the check (a bad one raises)
    except ValueError as e:
        raise _InvalidError(f"is not a valid URL ({e}): {value!r}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise _InvalidError(f"must be an http:// or https:// URL, got {value!r}")
    if not parts.hostname:
        raise _InvalidError(f"must name a host, got {value!r}")
    if parts.username is not None or parts.password is not None:
        # The URL is logged; credentials in it would be too.
        raise _InvalidError("must not hold credentials (user:password@)")
    if parts.query or parts.fragment:
        raise _InvalidError(f"must not hold a query or fragment, got {value!r}")
    return value.rstrip("/")


def _path(value: object) -> Path:
    if isinstance(value, str | os.PathLike) and str(os.fspath(value)).strip():
        return Path(value)
    raise _InvalidError(f"must be a path, got {value!r}")


def _device_id(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(DEVICE_ID_PATTERN, value):
        raise _InvalidError(
            f"must be 1 to 64 letters, digits, '.', '_' or '-' starting with a letter or digit, "
            f"got {value!r}"
        )
    return value


def _positive_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _InvalidError(f"must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise _InvalidError(f"must be a positive finite number of seconds, got {value!r}")
    return float(value)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidError(f"must be an integer, got {value!r}")
    if value < 1:
        raise _InvalidError(f"must be at least 1, got {value}")
    return value


def _log_level(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise _InvalidError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


def _optional_path(value: object) -> Path | None:
    return None if value is None else _path(value)


def _fingerprint(value: object) -> str | None:
    if value is None:
        return None
    text = value.replace(":", "").lower() if isinstance(value, str) else ""
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise _InvalidError("must be a SHA-256 fingerprint: 64 hex digits (colons allowed)")
    return text


def _secret(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise _InvalidError("must be a non-empty string of at most 256 characters")  # never echo a secret
    return value.strip()


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _InvalidError(f"must be true or false, got {value!r}")
    return value


def _policy(value: object) -> Policy:
    if isinstance(value, Policy):
        return value
    if not isinstance(value, dict):
        raise _InvalidError(f"must be a table ([policy]), got {value!r}")
    try:
        return parse_policy(value, source="[policy]")
    except ConfigError as e:
        raise _InvalidError(str(e).removeprefix("[policy]: ")) from None


def _limits(value: object) -> Limits:
    if isinstance(value, Limits):
        return value
    if not isinstance(value, dict):
        raise _InvalidError(f"must be a table ([limits]), got {value!r}")
    try:
        return parse_limits(value, source="[limits]")
    except ConfigError as e:
        raise _InvalidError(str(e).removeprefix("[limits]: ")) from None


_CHECKS: dict[str, Callable[[object], object]] = {
    "coordinator": _url,
    "data": _path,
    "state_dir": _path,
    "device_id": _device_id,
    "backoff_base_s": _positive_seconds,
    "backoff_cap_s": _positive_seconds,
    "request_timeout_s": _positive_seconds,
    "max_payload_bytes": _positive_int,
    "log_level": _log_level,
    "ca_cert": _optional_path,
    "ca_fingerprint": _fingerprint,
    "token": _secret,
    "token_file": _optional_path,
    "insecure": _flag,
    "policy": _policy,
    "limits": _limits,
}


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e

"""The agent's state directory: its exclusive lock and the persisted device id.

One agent runs per state directory. The lock is an ``fcntl.flock`` on
``state_dir/agent.lock``, taken without blocking, so a second agent started
by mistake on the same directory stops at once with a clear message instead
of fighting the first over the device's identity. The kernel drops the lock
when the process dies, so a crash never leaves a stale lock behind.

The device id is generated once (``dev-`` and 12 hex digits from
``os.urandom``) and kept in ``state_dir/device_id``, written to a temporary
file, fsynced and renamed, so a power cut never leaves a half-written id.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from fedge.errors import ConfigError
from fedge.wire import DEVICE_ID_PATTERN

__all__ = ["DEVICE_ID_FILE", "LOCK_FILE", "ROUNDS_FILE", "RoundsToday", "StateLock", "resolve_device_id"]

logger = logging.getLogger(__name__)

LOCK_FILE = "agent.lock"
DEVICE_ID_FILE = "device_id"


class StateLock:
    """An exclusive hold on a state directory, released by :meth:`release` or on exit.

    Args:
        state_dir: the directory; created (mode 0700) if missing.

    Raises:
        ConfigError: the directory cannot be created or written, or another
            agent holds it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"state_dir {str(state_dir)!r} cannot be created ({e.strerror})") from None
        lock_path = state_dir / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"state_dir {str(state_dir)!r} is not writable ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another agent is already running on state_dir {str(state_dir)!r} "
                f"(it holds {str(lock_path)!r})"
            ) from None
        except OSError as e:
            os.close(fd)
            raise ConfigError(
                f"state_dir {str(state_dir)!r}: cannot lock {LOCK_FILE} ({e.strerror})"
            ) from None
        # The holder's pid, for an operator wondering which process has it.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (idempotent); the lock file stays, as deleting it would race."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def resolve_device_id(
    state_dir: Path, configured: str | None, *, entropy: Callable[[int], bytes] = os.urandom
) -> str:
    """This device's id: ``configured`` if given, else the one kept in ``state_dir``.

    On the first run without a configured id, one is generated from
    ``entropy`` and written to ``state_dir/device_id``; later runs read it back.

    Args:
        state_dir: the (locked) state directory.
        configured: the id from the config, or ``None``.
        entropy: a source of random bytes (``os.urandom``).

    Returns:
        The device id; it matches :data:`fedge.wire.DEVICE_ID_PATTERN`.

    Raises:
        ConfigError: the kept id is malformed, or it cannot be read or written.
    """
    if configured is not None:
        return configured
    path = state_dir / DEVICE_ID_FILE
    try:
        kept = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        kept = None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the device id ({e})") from None
    if kept is not None:
        if not re.fullmatch(DEVICE_ID_PATTERN, kept):
            raise ConfigError(
                f"{path}: malformed device id {kept[:80]!r}; fix or delete the file "
                "(a new id makes this a new device to the coordinator)"
            )
        return kept
    device_id = "dev-" + entropy(6).hex()
    tmp = path.with_name(f".{DEVICE_ID_FILE}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(device_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the device id ({e.strerror})") from None
    logger.info("generated device id %s (kept in %s)", device_id, path)
    return device_id


ROUNDS_FILE = "rounds_today.json"


class RoundsToday:
    """How many rounds this device trained on the current local day (the policy's daily cap).

    Kept in ``state_dir/rounds_today.json`` so a restart does not reset the
    count; an unreadable file counts as zero (the worst it can do is allow
    one more day's worth of rounds).
    """

    def __init__(self, state_dir: Path, *, today: Callable[[], str] | None = None) -> None:
        self.path = state_dir / ROUNDS_FILE
        self._today = today or (lambda: dt.date.today().isoformat())
        self._day, self._count = self._load()

    def _load(self) -> tuple[str, int]:
        try:
            d = json.loads(self.path.read_text())
            return str(d["day"]), int(d["count"])
        except (OSError, ValueError, KeyError, TypeError):
            return self._today(), 0

    def count(self) -> int:
        return self._count if self._day == self._today() else 0

    def add(self) -> None:
        today = self._today()
        self._count = (self._count if self._day == today else 0) + 1
        self._day = today
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"day": today, "count": self._count}) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning("cannot keep the daily round count in %s (%s)", self.path, e)

"""Back up a coordinator's data directory while it runs (``fedge backup``).

The backup is itself a data directory: restoring is stopping the
coordinator, putting the folder in place of the old one, and starting it
(it resumes after the backup's last complete round). What is copied:

- ``fedge.db`` through SQLite's online backup API, so the copy is one
  consistent snapshot even while rounds complete (WAL mode lets the
  coordinator keep writing meanwhile);
- the checkpoints the snapshot's rounds refer to (a checkpoint file is
  complete before its round is, so every one named in the snapshot exists);
- the CA, the server certificate and key, and the admin token, with their
  modes (0600 keys stay 0600).

The destination is created with mode 0700 and must not exist: a backup
never overwrites anything.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from fedge.errors import ConfigError, StoreError

__all__ = ["backup_data_dir"]

_DB = "fedge.db"
_CHECKPOINTS = "checkpoints"
_KEEP = ("ca", "tls", "admin.token")


def backup_data_dir(data_dir: Path, out_dir: Path) -> dict[str, int]:
    """Copy ``data_dir`` to the new folder ``out_dir``; return counts of what was copied.

    Raises:
        ConfigError: ``data_dir`` holds no store, or ``out_dir`` exists.
        StoreError: SQLite could not read the store.
    """
    db = data_dir / _DB
    if not db.is_file():
        raise ConfigError(f"{data_dir} holds no fedge store ({_DB} is missing)")
    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists; a backup goes into a new folder")
    out_dir.mkdir(mode=0o700, parents=True)
    try:
        source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        target = sqlite3.connect(out_dir / _DB)
        try:
            source.backup(target)
            rows = target.execute(
                "SELECT checkpoint FROM rounds WHERE state = 'complete' AND checkpoint IS NOT NULL"
            ).fetchall()
        finally:
            target.close()
            source.close()
    except sqlite3.Error as e:
        raise StoreError(f"cannot back up {db}: {e}") from e
    (out_dir / _DB).chmod(0o600)
    (out_dir / _CHECKPOINTS).mkdir(mode=0o700)
    checkpoints = 0
    for (name,) in rows:
        src = data_dir / _CHECKPOINTS / Path(str(name)).name
        if src.exists():
            shutil.copy2(src, out_dir / _CHECKPOINTS / src.name)
            checkpoints += 1
    files = 0
    for name in _KEEP:
        src = data_dir / name
        if src.is_dir():
            shutil.copytree(src, out_dir / name, copy_function=shutil.copy2)
            files += sum(1 for p in (out_dir / name).iterdir() if p.is_file())
        elif src.is_file():
            shutil.copy2(src, out_dir / name)
            files += 1
    _fsync_tree(out_dir)
    return {"checkpoints": checkpoints, "files": files}


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

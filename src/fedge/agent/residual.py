"""The agent's error-feedback residual, kept in its state directory across rounds and restarts.

With top-k sparsification (:mod:`fedge.encoding`), what a device did not
send stays on the device and is added to its next delta. The residual is
derived from the device's private data, so it never leaves the device: it is
kept in ``state_dir/residual.safetensors`` (mode 0600), written to a
temporary file, fsynced and renamed, so a power cut leaves the old residual
or the new one, never half of one.

A residual made under another encoding or for params of another layout
(the federation changed) is dropped, with a log line, and error feedback
starts afresh: it is a correction, not state anything else depends on.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from fedge.params import Params, ParamsSpec

__all__ = ["RESIDUAL_FILE", "load_residual", "save_residual"]

logger = logging.getLogger(__name__)

RESIDUAL_FILE = "residual.safetensors"
_META_ENCODING = "fedge.encoding"


def load_residual(state_dir: Path, *, spec: ParamsSpec, encoding: str) -> Params | None:
    """The residual kept for ``encoding`` and params of ``spec``, or ``None`` if there is none that fits."""
    path = state_dir / RESIDUAL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.warning("cannot read the error-feedback residual %s (%s); starting afresh", path, e.strerror)
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, struct.error) as e:
        logger.warning("the error-feedback residual %s is unreadable (%s); starting afresh", path, e)
        return None
    # safetensors stores tensors sorted by name; the spec's order is the model's.
    kept = {name: tensors[name] for name in spec.names if name in tensors}
    if meta.get(_META_ENCODING) != encoding or set(tensors) != set(spec.names) or ParamsSpec.of(kept) != spec:
        logger.info("the error-feedback residual was made for another encoding or model; starting afresh")
        return None
    if not all(np.isfinite(a).all() for a in kept.values()):
        logger.warning("the error-feedback residual holds non-finite values; starting afresh")
        return None
    return kept


def save_residual(state_dir: Path, residual: Params, *, encoding: str) -> None:
    """Keep ``residual`` (made under ``encoding``) for the next round.

    Raises:
        OSError: the state directory cannot be written.
    """
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v) for k, v in residual.items()}
    body = save(tensors, metadata={_META_ENCODING: encoding})
    path = state_dir / RESIDUAL_FILE
    tmp = path.with_name(f".{RESIDUAL_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

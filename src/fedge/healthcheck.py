"""Liveness checks for container healthchecks and service probes (``fedge healthcheck``).

- coordinator: ``GET /healthz`` on the coordinator's own port over loopback.
  In TLS mode the server certificate must chain to the fedge CA in the data
  directory; its host name is not checked, because the probe dials 127.0.0.1
  while the certificate names the coordinator's public host.
- agent: an agent holds an exclusive ``flock`` on its state directory for as
  long as it runs, so the probe asks for that lock without blocking: if it
  gets it, no agent is running there.

Both use the standard library only, so the agent's image needs nothing more.
"""

from __future__ import annotations

import fcntl
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["check_agent", "check_coordinator"]

_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def check_coordinator(*, host: str, port: int, insecure: bool, ca_file: Path | None,
                      timeout_s: float = 5.0) -> tuple[bool, str]:
    """Ask the coordinator at ``host:port`` for ``/healthz``; return (healthy, why)."""
    host = _WILDCARD.get(host, host)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    context: ssl.SSLContext | None = None
    if insecure:
        url = f"http://{netloc}/healthz"
    else:
        if ca_file is None or not ca_file.is_file():
            return False, f"no CA certificate at {ca_file} to verify the coordinator with"
        context = ssl.create_default_context(cafile=str(ca_file))
        context.check_hostname = False  # see the module docstring; the chain is still verified
        url = f"https://{netloc}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            body = json.loads(response.read(4096) or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return False, f"{url}: {reason}"
    if body.get("status") != "ok":
        return False, f"{url} answered {body!r}"
    return True, f"{url} ok"


def check_agent(state_dir: Path) -> tuple[bool, str]:
    """Whether an agent runs on ``state_dir`` (holds its lock); return (healthy, why)."""
    from fedge.agent.state import LOCK_FILE

    lock = state_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"no agent has run on {state_dir} ({LOCK_FILE} is missing)"
    except OSError as e:
        return False, f"cannot open {lock}: {e.strerror}"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True, f"an agent holds {state_dir}"
    finally:
        os.close(fd)
    return False, f"no agent is running on {state_dir}"

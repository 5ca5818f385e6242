"""The coordinator process: bind the listening socket, serve the app with uvicorn, shut down cleanly.

The socket is bound here, before uvicorn starts, so that a port already in
use is a :class:`~fedge.errors.ConfigError` with one clear line rather than
a log record from deep inside the server. SIGTERM and SIGINT stop the server
gracefully (uvicorn's handlers); the store is closed on the way out, and an
open round is left open in the store, to be restarted by the next start.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket

import uvicorn

from fedge.coordinator.app import create_app
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.service import Coordinator
from fedge.errors import ConfigError, CoordinatorError

__all__ = ["bind", "serve"]

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6).

    Raises:
        ConfigError: the address is in use, not local, or cannot be resolved.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"server.host {host!r} cannot be resolved: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (server.port)") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(config: CoordinatorConfig, *, exit_when_done: bool = False, log_level: str = "warning") -> int:
    """Run the coordinator until it is stopped (or, with ``exit_when_done``, until training ends).

    Returns:
        The exit status: 0.

    Raises:
        ConfigError: a bad setting, or the port is taken.
        CoordinatorError: the round driver failed (exit status 1 from the CLI).
    """
    sock = bind(config.host, config.port)
    try:
        coordinator = Coordinator(config)
    except BaseException:
        sock.close()
        raise
    server: uvicorn.Server | None = None

    def finished() -> None:
        if not exit_when_done or server is None:
            return
        # Linger for two check-in periods so every agent hears "done".
        grace = min(2 * config.wait_s + 1.0, 30.0)
        logger.info("training complete; exiting in %.1f s", grace)
        asyncio.get_running_loop().call_later(grace, setattr, server, "should_exit", True)

    failure: list[BaseException] = []

    def crashed(error: BaseException) -> None:
        failure.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(coordinator, on_done=finished, on_crash=crashed)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
            limit_concurrency=4096,
            backlog=2048,
            server_header=False,
        )
    )
    logger.info("coordinator listening on http://%s:%d (data in %s)", host, port, config.data_dir)
    # uvicorn stops gracefully on SIGTERM/SIGINT and then raises the signal
    # again under the handler it found; these handlers make that a clean
    # exit (status 0, no KeyboardInterrupt traceback) instead of a kill.
    stopped_by: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: stopped_by.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        coordinator.close()
        sock.close()
    if stopped_by:
        logger.info("coordinator stopped by %s", signal.Signals(stopped_by[0]).name)
    if failure:
        # Everything up to the last complete round is in the store: a restart
        # (systemd, a supervisor, the operator) resumes from there.
        raise CoordinatorError(f"the round driver failed: {type(failure[0]).__name__}: {failure[0]}")
    return 0

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
import ipaddress
import logging
import signal
import socket
import ssl
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fedge import pki
from fedge.coordinator.app import TLS_IDENTITY, create_app
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.identity import Identity, tls_files
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


class _TlsIdentityProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus the verified client certificate's identity in every scope.

    The handshake (``CERT_OPTIONAL`` against the fedge CA) has verified the
    chain and the validity period by the time the connection is made; the
    certificate is parsed once per connection, not once per request.
    """

    _identity: tuple[str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            try:
                cert = x509.load_der_x509_certificate(der)
                self._identity = (pki.device_id_of(cert), pki.serial_hex(cert))
            except (ValueError, pki.PKIError):
                self._identity = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": {TLS_IDENTITY: self._identity}}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _tls_context(config: CoordinatorConfig) -> ssl.SSLContext:
    files = tls_files(config.data_dir)
    missing = [p for p in (files.ca_cert, files.server_cert, files.server_key) if not p.exists()]
    if missing:
        raise ConfigError(
            f"no TLS material in {config.data_dir} (missing {', '.join(str(p) for p in missing)}): run "
            f"`fedge ca init --data-dir {config.data_dir}` and `fedge ca issue-server --data-dir "
            f"{config.data_dir} --host NAME --ip ADDRESS`, or pass --insecure for plain HTTP on loopback"
        )
    try:
        return pki.server_ssl_context(cert_file=files.server_cert, key_file=files.server_key,
                                      ca_file=files.ca_cert)
    except (OSError, ssl.SSLError, pki.PKIError) as e:
        raise ConfigError(f"the TLS files in {config.data_dir} cannot be used: {e}") from None


def serve(config: CoordinatorConfig, *, exit_when_done: bool = False, log_level: str = "warning") -> int:
    """Run the coordinator until it is stopped (or, with ``exit_when_done``, until training ends).

    Returns:
        The exit status: 0.

    Raises:
        ConfigError: a bad setting, or the port is taken.
        CoordinatorError: the round driver failed (exit status 1 from the CLI).
    """
    if config.insecure:
        if not config.insecure_allow_remote and not _is_loopback(config.host):
            raise ConfigError(
                f"--insecure serves plain HTTP, which fedge allows on loopback only; {config.host} is not "
                "a loopback address (add --insecure-allow-remote to accept the risk)"
            )
        context = None
    else:
        context = _tls_context(config)
    sock = bind(config.host, config.port)
    try:
        coordinator = Coordinator(config)
        identity = None if context is None else Identity(config.data_dir, coordinator.store,
                                                         cert_days=config.cert_days)
    except BaseException:
        sock.close()
        raise
    if context is None:
        logger.warning(
            "INSECURE: plain HTTP without device authentication on %s:%d; any process that can reach it "
            "can act as any device", config.host, config.port,
        )
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

    app = create_app(coordinator, identity=identity, on_done=finished, on_crash=crashed)
    host, port = sock.getsockname()[:2]
    tls: dict[str, Any] = {} if context is None else {
        "http": _TlsIdentityProtocol, "ssl_context_factory": lambda *_: context,
    }
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
            limit_concurrency=4096,
            backlog=2048,
            server_header=False,
            **tls,
        )
    )
    logger.info("coordinator listening on %s://%s:%d (data in %s)", "http" if context is None else "https",
                host, port, config.data_dir)
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

"""The wire meter: every byte the agent's own TCP sockets send and receive, TLS records included.

``fedge lab`` compares what an agent says it sent and received with what the
kernel counted on the device's virtual link, so the count has to be taken
where the kernel sees the bytes: at ``socket.send``/``socket.recv``, below
TLS. httpx does TLS through httpcore on an ``ssl.SSLSocket``, which hides the
records, so the metered streams here do TLS themselves over memory BIOs
(``ssl.SSLContext.wrap_bio``): the same ``SSLContext`` verifies the same
certificates and names, only the record bytes pass through our hands.

Layers, bottom up::

    _SocketStream  a TCP socket; counts every byte at send/recv (plain http:// uses it as is)
    _TlsStream     TLS over a lower stream with memory BIOs (over a _TlsStream for an https:// proxy)
    MeteredBackend the httpcore NetworkBackend that opens _SocketStreams
    metered_transport  an httpx transport over an httpcore pool using that backend

Only public httpx and httpcore names are used (``httpx.BaseTransport``,
``httpcore.ConnectionPool(network_backend=...)``, the exception classes).
Importing this module imports httpx and httpcore, so the agent imports it
where it builds its transport (as it does :mod:`fedge.transport.http`), not
at the top of its modules.
"""

from __future__ import annotations

import functools
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import httpcore
import httpx

__all__ = ["MeteredBackend", "WireCounts", "WireMeter", "metered_transport"]

# TLS writes are cut into pieces of this size, so a large upload is never
# held twice in memory (plaintext and records) and each piece has its own
# write deadline, as ``SSLSocket.sendall`` gives each ``send``.
_WRITE_PIECE = 64 * 1024
# The most bytes one recv asks for below TLS: several records, so a download
# costs fewer system calls and fewer trips through the loop below.
_RAW_READ = 256 * 1024

_R = TypeVar("_R")


@dataclass(frozen=True)
class WireCounts:
    """Totals at one instant: TCP payload bytes sent and received, and TCP connections opened."""

    sent: int = 0
    received: int = 0
    connections: int = 0

    def __post_init__(self) -> None:
        for name in ("sent", "received", "connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"WireCounts.{name} must be an integer >= 0, got {value!r}")


class WireMeter:
    """Thread-safe counters of the bytes an agent's sockets moved, and of its connections.

    The counts are TCP payload: TLS records (handshakes, certificates,
    alerts) and HTTP headers are in them; IP and TCP headers, ACKs and
    retransmissions are not (the kernel's link counters have those).

    Args:
        start: the totals to count on from (a restarted agent's last saved counts).
    """

    def __init__(self, start: WireCounts | None = None) -> None:
        start = start if start is not None else WireCounts()
        self._lock = threading.Lock()
        self._sent = start.sent
        self._received = start.received
        self._connections = start.connections

    @property
    def sent(self) -> int:
        """Bytes sent so far."""
        return self._sent

    @property
    def received(self) -> int:
        """Bytes received so far."""
        return self._received

    @property
    def connections(self) -> int:
        """TCP connections opened so far."""
        return self._connections

    def counts(self) -> WireCounts:
        """The three totals, taken together (no count moves between them)."""
        with self._lock:
            return WireCounts(self._sent, self._received, self._connections)

    def carry_over(self, previous: WireCounts) -> None:
        """Add totals counted before (by an earlier run of the agent) to these."""
        with self._lock:
            self._sent += previous.sent
            self._received += previous.received
            self._connections += previous.connections

    def count_sent(self, nbytes: int) -> None:
        """Record ``nbytes`` handed to the kernel by one ``send``."""
        with self._lock:
            self._sent += nbytes

    def count_received(self, nbytes: int) -> None:
        """Record ``nbytes`` returned by one ``recv``."""
        with self._lock:
            self._received += nbytes

    def count_connection(self) -> None:
        """Record one TCP connection established."""
        with self._lock:
            self._connections += 1


class _Lower(Protocol):
    """What a TLS layer needs from the layer under it (a socket, or TLS for a proxy tunnel)."""

    def recv_some(self, max_bytes: int, deadline: float | None) -> bytes: ...

    def send_all(self, data: bytes, deadline: float | None) -> None: ...

    @property
    def sock(self) -> socket.socket: ...

    def close(self) -> None: ...


def _remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (a ``time.monotonic`` instant); a past deadline is a timeout."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _readable(sock: socket.socket) -> bool:
    """Whether a read would not block: data, end of stream, or an error (httpcore's idle check)."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _SocketStream(httpcore.NetworkStream):
    """A connected TCP socket whose every send and recv is counted; the stream of plain http://."""

    def __init__(self, sock: socket.socket, meter: WireMeter) -> None:
        self._sock = sock
        self._meter = meter

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def recv_some(self, max_bytes: int, deadline: float | None) -> bytes:
        self._sock.settimeout(_remaining(deadline))
        data = self._sock.recv(max_bytes)
        self._meter.count_received(len(data))
        return data

    def send_all(self, data: bytes, deadline: float | None) -> None:
        view = memoryview(data)
        while view:
            self._sock.settimeout(_remaining(deadline))
            n = self._sock.send(view)
            self._meter.count_sent(n)
            view = view[n:]

    # httpcore's NetworkStream: a timeout bounds each socket call, as in httpcore's own SyncStream.
    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # The hot path of a plain download: no context manager, no deadline arithmetic.
        try:
            self._sock.settimeout(timeout)
            data = self._sock.recv(max_bytes)
        except TimeoutError as e:
            raise httpcore.ReadTimeout(str(e) or "timed out") from e
        except OSError as e:
            raise httpcore.ReadError(str(e) or type(e).__name__) from e
        self._meter.count_received(len(data))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            view = memoryview(buffer)
            while view:
                self._sock.settimeout(timeout)
                n = self._sock.send(view)
                self._meter.count_sent(n)
                view = view[n:]

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _TlsStream.connect(self, ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> object:
        return _socket_info(self._sock, info)


class _TlsStream(httpcore.NetworkStream):
    """TLS over a lower stream through memory BIOs, so the records are sent and counted below it.

    The ``SSLContext`` is the caller's, untouched: certificate verification,
    hostname and IP checks, client certificates and protocol versions are
    exactly those of ``SSLContext.wrap_socket``. Like ``SSLSocket`` (whose
    ``suppress_ragged_eofs`` is on by default), a TCP close without a TLS
    close_notify reads as the end of the stream; HTTP framing (h11) catches a
    truncated body. Like httpcore's stream, :meth:`close` closes the socket
    without sending a close_notify, so the byte counts match the old path.
    """

    def __init__(self, lower: _Lower, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self._lower = lower
        self._ssl = ssl_object
        self._in = incoming
        self._out = outgoing

    @classmethod
    def connect(cls, lower: _Lower, context: ssl.SSLContext, server_hostname: str | None,
                timeout: float | None) -> _TlsStream:
        """Handshake over ``lower`` within ``timeout`` (the whole handshake, as ``SSLSocket``'s)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        try:
            with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                ssl_object = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
                stream = cls(lower, ssl_object, incoming, outgoing)
                stream._run(ssl_object.do_handshake, _deadline(timeout))
        except BaseException:
            lower.close()
            raise
        return stream

    @property
    def sock(self) -> socket.socket:
        return self._lower.sock

    def _run(self, operation: Callable[[], _R], deadline: float | None) -> _R:
        """Run one TLS operation, moving records between the BIOs and the lower stream until it is done."""
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                self._flush(deadline)
                data = self._lower.recv_some(_RAW_READ, deadline)
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
                continue
            self._flush(deadline)
            return result

    def _flush(self, deadline: float | None) -> None:
        if self._out.pending:
            self._lower.send_all(self._out.read(), deadline)

    def recv_some(self, max_bytes: int, deadline: float | None) -> bytes:
        try:
            data = self._run(functools.partial(self._ssl.read, max_bytes), deadline)
        except ssl.SSLEOFError:  # the peer closed TCP without a close_notify
            return b""
        # One read gives one record (16 KiB at most); records already received
        # are decrypted now too, up to max_bytes, so httpcore loops less.
        parts = [data]
        size = len(data)
        while data and size < max_bytes and self._in.pending:
            try:
                data = self._ssl.read(max_bytes - size)
            except (ssl.SSLWantReadError, ssl.SSLEOFError):
                break  # the rest of a record is still on its way; the next read waits for it
            parts.append(data)
            size += len(data)
        self._flush(deadline)  # a read may have produced records to send (a key update's answer)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send_all(self, data: bytes, deadline: float | None) -> None:
        for start in range(0, len(data), _WRITE_PIECE):
            self._run(functools.partial(self._ssl.write, data[start:start + _WRITE_PIECE]), deadline)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            return self.recv_some(max_bytes, _deadline(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            for start in range(0, len(buffer), _WRITE_PIECE):
                piece = buffer[start:start + _WRITE_PIECE]
                self._run(functools.partial(self._ssl.write, piece), _deadline(timeout))

    def close(self) -> None:
        self._lower.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        # TLS inside TLS: a tunnel through an https:// proxy.
        return _TlsStream.connect(self, ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> object:
        if info == "ssl_object":
            return self._ssl
        if info == "is_readable":
            return self._ssl.pending() > 0 or self._in.pending > 0 or _readable(self.sock)
        return _socket_info(self.sock, info)


def _socket_info(sock: socket.socket, info: str) -> object:
    """The ``get_extra_info`` answers httpcore asks of every stream."""
    if info == "client_addr":
        return sock.getsockname()
    if info == "server_addr":
        return sock.getpeername()
    if info == "socket":
        return sock
    if info == "is_readable":
        return _readable(sock)
    return None


@contextmanager
def _mapped(timeout: type[httpcore.TimeoutException], failure: type[httpcore.NetworkError]) -> Iterator[None]:
    """Socket and TLS failures as the httpcore exceptions its pool and httpx expect."""
    try:
        yield
    except TimeoutError as e:  # socket.timeout is TimeoutError
        raise timeout(str(e) or "timed out") from e
    except OSError as e:  # ssl.SSLError (certificate verify failed...) included
        raise failure(str(e) or type(e).__name__) from e


class MeteredBackend(httpcore.NetworkBackend):
    """An httpcore network backend whose TCP connections count their bytes in ``meter``."""

    def __init__(self, meter: WireMeter) -> None:
        self._meter = meter

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        source = None if local_address is None else (local_address, 0)
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            sock = socket.create_connection((host, port), timeout, source_address=source)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BaseException:
                sock.close()
                raise
        self._meter.count_connection()
        return _SocketStream(sock, self._meter)


# httpcore's failures and the httpx classes with the same names; a subclass maps by its nearest ancestor.
_HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
}


@contextmanager
def _as_httpx(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        for cls in type(e).__mro__:
            target = _HTTPX_ERRORS.get(cls)
            if target is not None:
                raise target(str(e), request=request) from e
        raise


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, chunks: Iterable[bytes], request: httpx.Request) -> None:
        self._chunks = chunks
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx(self._request):
            yield from self._chunks

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if callable(close):
            close()


class _MeteredTransport(httpx.BaseTransport):
    """An httpx transport over an httpcore connection pool whose connections are metered."""

    def __init__(self, pool: httpcore.ConnectionPool) -> None:
        self._pool = pool

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.SyncByteStream):
            raise TypeError("the metered transport sends synchronous request bodies only")
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx(request):
            response = self._pool.handle_request(core)
        if not isinstance(response.stream, Iterable):
            raise TypeError("httpcore returned an asynchronous body to a synchronous pool")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, request),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def metered_transport(
    meter: WireMeter,
    *,
    ssl_context: ssl.SSLContext,
    limits: httpx.Limits,
    proxy: str | None = None,
) -> httpx.BaseTransport:
    """An httpx transport (HTTP/1.1) whose every connection counts its bytes in ``meter``.

    Args:
        meter: where the bytes are counted.
        ssl_context: verifies the server and carries any client certificate.
        limits: the pool's size and keep-alive settings.
        proxy: an ``http://``, ``https://`` or ``socks5://`` proxy URL to go
            through, or ``None``; the bytes to the proxy are the ones counted.

    Returns:
        The transport, for ``httpx.Client(transport=...)``.
    """
    return _MeteredTransport(
        httpcore.ConnectionPool(
            ssl_context=ssl_context,
            proxy=None if proxy is None else httpcore.Proxy(proxy),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=MeteredBackend(meter),
        )
    )

"""A counting TCP relay for the wire-meter tests: what the far side of the client's sockets saw.

The relay listens on 127.0.0.1, and copies every connection to an upstream
address, counting the bytes each way and the connections, so a test can
compare the agent's own counts with an independent count of the same TCP
streams. With ``connect_proxy=True`` it is an HTTP CONNECT proxy instead: it
reads a ``CONNECT host:port`` request (counted like any other bytes), answers
200, and relays to that address.

Bytes the server sends after the client closed its side (``down_late``; a
TLS server answers a client's close with a close_notify) reach a closed
socket: the client cannot read, so cannot count, them. They are counted
apart, so a test can compare the rest exactly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Relay:
    def __init__(self, upstream: tuple[str, int] | None, *, connect_proxy: bool = False) -> None:
        self.upstream = upstream
        self.connect_proxy = connect_proxy
        self.up = 0  # client -> upstream
        self.down = 0  # upstream -> client
        self.down_late = 0  # upstream -> client after the client had closed (included in down)
        self.accepted = 0
        self.targets: list[bytes] = []  # CONNECT targets seen
        self._lock = threading.Lock()
        self._pumps: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until every relayed connection has ended in both directions."""
        deadline = time.monotonic() + timeout_s
        for pump in list(self._pumps):
            pump.join(max(0.0, deadline - time.monotonic()))
            assert not pump.is_alive(), "a relayed connection is still open"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            serving = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self.accepted += 1
                self._pumps.append(serving)
            serving.start()

    def _add(self, direction: str, n: int) -> None:
        with self._lock:
            setattr(self, direction, getattr(self, direction) + n)

    def _serve(self, client: socket.socket) -> None:
        with client:
            upstream = self._upstream(client)
            if upstream is None:
                return
            with socket.create_connection(upstream) as server:
                client_done = threading.Event()
                up = threading.Thread(target=self._pump, args=(client, server, "up", client_done))
                up.start()
                self._pump(server, client, "down", client_done)
                up.join()

    def _upstream(self, client: socket.socket) -> tuple[str, int] | None:
        upstream = self.upstream
        if self.connect_proxy:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(1)  # byte by byte: nothing past the request is read here
                if not chunk:
                    return None
                self._add("up", 1)
                head += chunk
            target = head.split(b" ")[1]
            self.targets.append(target)
            host, port = target.rsplit(b":", 1)
            upstream = (host.decode(), int(port))
            reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
            client.sendall(reply)
            self._add("down", len(reply))
        return upstream

    def _pump(
        self, source: socket.socket, sink: socket.socket, direction: str, client_done: threading.Event
    ) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                late = direction == "down" and client_done.is_set()
                sink.sendall(data)
                self._add(direction, len(data))
                if late:
                    self._add("down_late", len(data))
        except OSError:
            pass
        finally:
            if direction == "up":
                client_done.set()  # before the server learns of it below
            for s, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
                with contextlib.suppress(OSError):
                    s.shutdown(how)

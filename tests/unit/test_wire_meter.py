"""Tests for the wire meter: exact byte counts against a counting relay, and TLS and timeouts as before.

A real TLS server (``http.server`` with the fedge server context) sits behind
:class:`wire_relay.Relay`, which counts what crossed each TCP connection; the
meter must agree with it to the byte, handshakes, certificates and
reconnections included. The refusals (wrong CA, wrong name, no client
certificate) and the timeouts are checked on both the metered and the plain
httpx path, so "exactly as before" is tested, not assumed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from wire_relay import Relay

from fedge import pki
from fedge.agent.textfile import write_textfile
from fedge.agent.traffic import WireRecorder, load_wire_counts, write_wire_counts
from fedge.errors import ConfigError, TransportError
from fedge.transport.http import HttpTransport
from fedge.transport.meter import WireCounts, WireMeter
from fedge.transport.tls import client_ssl_context, server_ssl_context

NOW = dt.datetime.now(dt.UTC)

# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Files:
    ca: Path
    other_ca: Path
    server: tuple[Path, Path]
    wrong_name_server: tuple[Path, Path]  # the right CA, but for coord.example and 10.0.0.9 only
    device: tuple[Path, Path]
    stranger: tuple[Path, Path]  # a device certificate from another CA


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("wire-tls")
    ca, other = pki.create_ca(now=NOW - dt.timedelta(days=1)), pki.create_ca(common_name="other", now=NOW)

    def save(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        pki.write_pem(d / f"{name}.crt", pki.cert_pem(cert))
        pki.write_private_key(d / f"{name}.key", key)
        return d / f"{name}.crt", d / f"{name}.key"

    def device(signer: pki.CA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = pki.new_device_key()
        return pki.sign_device_csr(signer, pki.make_csr(key, "dev-1"), device_id="dev-1", valid_days=5,
                                   now=NOW), key

    pki.write_pem(d / "ca.crt", pki.cert_pem(ca.cert))
    pki.write_pem(d / "other.crt", pki.cert_pem(other.cert))
    return Files(
        ca=d / "ca.crt",
        other_ca=d / "other.crt",
        server=save("server", *pki.issue_server_cert(ca, hosts=["localhost"], ips=["127.0.0.1"], now=NOW)),
        wrong_name_server=save("wrong", *pki.issue_server_cert(ca, hosts=["coord.example"], ips=["10.0.0.9"],
                                                               now=NOW)),
        device=save("device", *device(ca)),
        stranger=save("stranger", *device(other)),
    )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peers: ClassVar[list[object]] = []  # the subject of each request's client certificate

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        self._serve(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _serve(self, body: bytes) -> None:
        if isinstance(self.connection, ssl.SSLSocket):
            cert = self.connection.getpeercert()
            self.peers.append(cert.get("subject") if cert else None)
        path, _, query = self.path.partition("?")
        headers = {}
        if path == "/slow":
            time.sleep(1.0)
        if path == "/close":  # the server ends the connection and says so
            self.close_connection = True
            headers["Connection"] = "close"
        if path == "/drop":  # the server ends the connection without a word (a keep-alive timeout)
            self.close_connection = True
        payload = b"x" * int(query) if path == "/bytes" else f"got {len(body)}".encode()
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = self.socket.accept()
        if self.context is None:
            return sock, address
        # The handshake runs in the handler's thread, at its first read.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # refused handshakes are the point of some tests


@contextmanager
def serving(context: ssl.SSLContext | None) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 (TLS with ``context``); yields its port."""
    Handler.peers = []
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.context = context
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def server_context(files: Files, *, require_client: bool = True, wrong_name: bool = False) -> ssl.SSLContext:
    cert, key = files.wrong_name_server if wrong_name else files.server
    context = server_ssl_context(cert_file=cert, key_file=key, ca_file=files.ca)
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client(
    url: str, files: Files, meter: WireMeter | None, *, ca: Path | None = None,
    identity: tuple[Path, Path] | bool | None = True, trust_env: bool = False,
) -> HttpTransport:
    if url.startswith("http://"):
        return HttpTransport(url, trust_env=trust_env, meter=meter)
    pair = files.device if identity is True else identity or None
    context = client_ssl_context(ca_file=ca or files.ca, cert_file=pair[0] if pair else None,
                                 key_file=pair[1] if pair else None)
    return HttpTransport(url, verify=context, trust_env=trust_env, meter=meter)


def get(t: HttpTransport, path: str, *, timeout_s: float = 10.0) -> bytes:
    r = t.request("GET", path, headers={}, timeout_s=timeout_s)
    assert r.status == 200
    return r.body


def exchange(t: HttpTransport) -> None:
    """A handful of requests: small and large bodies both ways, a server close, a silent server close."""
    assert get(t, "/bytes?10") == b"x" * 10
    r = t.request("POST", "/echo", headers={}, content=os.urandom(300_000), timeout_s=10.0)
    assert r.body == b"got 300000"
    assert len(get(t, "/bytes?1000000")) == 1_000_000
    get(t, "/close")  # the server closes: the next request reconnects
    get(t, "/bytes?5")
    get(t, "/drop")  # closed without a word: the pool finds the idle connection readable
    time.sleep(0.2)
    get(t, "/bytes?5")


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


# --------------------------------------------------------------------------- exact counts

# A TLS 1.3 close_notify record: 5 bytes of header, the 2-byte alert, its content type, a 16-byte tag.
_CLOSE_NOTIFY = 24


def assert_counted(meter: WireMeter, relay: Relay, *, tls_connections: int) -> None:
    """The meter's counts are the relay's, less what the server sent after the client had closed.

    Python's TLS server answers a client's close with a close_notify, which
    reaches a closed socket: no client can count it (the kernel's link
    counters do: about 24 bytes a connection).
    """
    assert meter.counts() == WireCounts(
        sent=relay.up, received=relay.down - relay.down_late, connections=relay.accepted
    )
    assert relay.accepted >= tls_connections
    assert relay.down_late <= _CLOSE_NOTIFY * tls_connections


def test_tls_counts_equal_what_crossed_the_connections(files: Files) -> None:
    meter = WireMeter()
    with serving(server_context(files)) as port, Relay(("127.0.0.1", port)) as relay:
        url = f"https://127.0.0.1:{relay.port}"
        with client(url, files, meter) as t:
            exchange(t)
        with client(url, files, meter) as t:  # a new transport on the same meter: one more connection
            get(t, "/bytes?7")
        relay.wait_idle()
    assert_counted(meter, relay, tls_connections=4)
    assert meter.sent > 300_000 and meter.received > 1_000_000
    # Mutual TLS happened: the server saw the device's certificate on every request.
    assert Handler.peers and all(p == ((("commonName", "dev-1"),),) for p in Handler.peers)


def test_plain_http_counts_equal_what_crossed_the_connections(files: Files) -> None:
    meter = WireMeter()
    with serving(None) as port, Relay(("127.0.0.1", port)) as relay:
        with client(f"http://127.0.0.1:{relay.port}", files, meter) as t:
            exchange(t)
        relay.wait_idle()
    assert_counted(meter, relay, tls_connections=0)
    assert relay.accepted == 3


def test_pooled_requests_share_one_connection(files: Files) -> None:
    meter = WireMeter()
    with serving(server_context(files)) as port, client(f"https://127.0.0.1:{port}", files, meter) as t:
        for _ in range(5):
            get(t, "/bytes?100")
    assert meter.connections == 1


def test_counts_through_an_environment_proxy_equal_what_the_proxy_relayed(
    files: Files, no_proxy_env: pytest.MonkeyPatch
) -> None:
    meter = WireMeter()
    with serving(server_context(files)) as port, Relay(None, connect_proxy=True) as proxy:
        no_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        with client(f"https://127.0.0.1:{port}", files, meter, trust_env=True) as t:
            exchange(t)
        proxy.wait_idle()
    assert proxy.targets == [f"127.0.0.1:{port}".encode()] * 3
    assert_counted(meter, proxy, tls_connections=3)


def test_no_proxy_bypasses_the_environment_proxy(files: Files, no_proxy_env: pytest.MonkeyPatch) -> None:
    meter = WireMeter()
    with serving(server_context(files)) as port, Relay(None, connect_proxy=True) as proxy:
        no_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
        with client(f"https://127.0.0.1:{port}", files, meter, trust_env=True) as t:
            get(t, "/bytes?3")
    assert proxy.accepted == 0 and meter.connections == 1


def test_an_environment_proxy_of_an_unknown_scheme_is_refused(
    files: Files, no_proxy_env: pytest.MonkeyPatch
) -> None:
    no_proxy_env.setenv("HTTPS_PROXY", "ftp://proxy.example:21")
    with pytest.raises(ConfigError, match=r"'ftp://proxy\.example:21'.*scheme"):
        client("https://127.0.0.1:1", files, WireMeter(), trust_env=True)
    client("https://127.0.0.1:1", files, WireMeter(), trust_env=False).close()  # not read without trust_env


@pytest.mark.skipif(importlib.util.find_spec("socksio") is not None, reason="socksio is installed")
def test_a_socks_proxy_without_socksio_is_refused(files: Files, no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ConfigError, match=r"socks5://127\.0\.0\.1:1080.*socksio"):
        client("https://127.0.0.1:1", files, WireMeter(), trust_env=True)


# --------------------------------------------------------------------------- TLS exactly as before

METERED = pytest.mark.parametrize("metered", [False, True], ids=["httpx", "metered"])


def meter_if(metered: bool) -> WireMeter | None:
    return WireMeter() if metered else None


@METERED
def test_a_server_of_another_ca_is_refused(files: Files, metered: bool) -> None:
    meter = meter_if(metered)
    with serving(server_context(files)) as port, \
            client(f"https://127.0.0.1:{port}", files, meter, ca=files.other_ca) as t, \
            pytest.raises(TransportError, match=r"ConnectError.*CERTIFICATE_VERIFY_FAILED"):
        get(t, "/bytes?1")
    if meter is not None:  # the refused handshake is on the wire too
        assert meter.connections == 1 and meter.sent > 0 and meter.received > 0


@METERED
def test_a_server_certificate_for_another_address_is_refused(files: Files, metered: bool) -> None:
    with serving(server_context(files, wrong_name=True)) as port, \
            client(f"https://127.0.0.1:{port}", files, meter_if(metered)) as t, \
            pytest.raises(TransportError, match=r"ConnectError.*IP address mismatch.*127\.0\.0\.1"):
        get(t, "/bytes?1")


@METERED
def test_a_host_name_is_checked_against_the_certificate(files: Files, metered: bool) -> None:
    with serving(server_context(files, wrong_name=True)) as port, \
            client(f"https://localhost:{port}", files, meter_if(metered)) as t, \
            pytest.raises(TransportError, match=r"ConnectError.*Hostname mismatch.*localhost"):
        get(t, "/bytes?1")


@METERED
def test_a_mutual_tls_server_refuses_a_client_without_a_certificate(files: Files, metered: bool) -> None:
    with serving(server_context(files)) as port, \
            client(f"https://127.0.0.1:{port}", files, meter_if(metered), identity=None) as t, \
            pytest.raises(TransportError, match=r"certificate required|CERTIFICATE_REQUIRED"):
        get(t, "/bytes?1")
    assert Handler.peers == []


@METERED
def test_a_mutual_tls_server_refuses_a_certificate_of_another_ca(files: Files, metered: bool) -> None:
    with serving(server_context(files)) as port, \
            client(f"https://127.0.0.1:{port}", files, meter_if(metered),
                   identity=files.stranger) as t, \
            pytest.raises(TransportError, match=r"(?i)unknown ca"):
        get(t, "/bytes?1")
    assert Handler.peers == []


@METERED
def test_the_handshake_is_bounded_by_the_timeout(files: Files, metered: bool) -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts TCP (the backlog), never answers
        url = f"https://127.0.0.1:{mute.getsockname()[1]}"
        with client(url, files, meter_if(metered)) as t, \
                pytest.raises(TransportError, match="ConnectTimeout"):
            started = time.monotonic()
            get(t, "/", timeout_s=0.3)
    assert time.monotonic() - started < 2.0


@METERED
def test_a_slow_answer_is_bounded_by_the_timeout(files: Files, metered: bool) -> None:
    with serving(server_context(files)) as port, \
            client(f"https://127.0.0.1:{port}", files, meter_if(metered)) as t, \
            pytest.raises(TransportError, match="ReadTimeout"):
        get(t, "/slow", timeout_s=0.3)


@contextmanager
def deaf_tls_server(files: Files) -> Iterator[int]:
    """Completes TLS handshakes, then never reads: uploads to it fill the socket buffers."""
    done = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    context = server_context(files)

    def serve() -> None:
        with contextlib.suppress(OSError):
            raw, _ = listener.accept()
            with context.wrap_socket(raw, server_side=True) as tls:
                done.wait(10)
                del tls

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        listener.close()
        thread.join(10)


@METERED
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_stalled_upload_is_bounded_by_the_timeout(files: Files, metered: bool, scheme: str) -> None:
    with contextlib.ExitStack() as stack:
        if scheme == "https":
            port = stack.enter_context(deaf_tls_server(files))
        else:
            port = stack.enter_context(socket.create_server(("127.0.0.1", 0))).getsockname()[1]
        t = stack.enter_context(client(f"{scheme}://127.0.0.1:{port}", files, meter_if(metered)))
        with pytest.raises(TransportError, match="WriteTimeout"):
            t.request("POST", "/", headers={}, content=bytes(64 * 1024 * 1024), timeout_s=0.5)


@METERED
def test_a_refused_connection_is_a_transport_error(files: Files, metered: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    meter = meter_if(metered)
    with client(f"https://127.0.0.1:{port}", files, meter) as t, \
            pytest.raises(TransportError, match="ConnectError"):
        get(t, "/")
    assert meter is None or meter.counts() == WireCounts()


# --------------------------------------------------------------------------- the meter


def test_wire_counts_refuse_what_is_not_a_count() -> None:
    with pytest.raises(ValueError, match=r"WireCounts\.sent must be an integer >= 0, got -1"):
        WireCounts(sent=-1)
    with pytest.raises(ValueError, match=r"WireCounts\.received .* got True"):
        WireCounts(received=True)
    with pytest.raises(ValueError, match=r"WireCounts\.connections .* got 1\.5"):
        WireCounts(connections=1.5)  # type: ignore[arg-type]


def test_the_meter_counts_from_many_threads_without_losing_any() -> None:
    meter = WireMeter(WireCounts(sent=5, received=7, connections=1))

    def hammer() -> None:
        for _ in range(20_000):
            meter.count_sent(3)
            meter.count_received(2)
        meter.count_connection()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert meter.counts() == WireCounts(sent=5 + 8 * 60_000, received=7 + 8 * 40_000, connections=9)
    meter.carry_over(WireCounts(sent=1, received=2, connections=3))
    assert (meter.sent, meter.received, meter.connections) == (5 + 8 * 60_000 + 1, 7 + 8 * 40_000 + 2, 12)


# --------------------------------------------------------------------------- wire.json


def test_wire_json_is_written_atomically_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "wire.json"
    old = os.umask(0o077)
    try:
        write_wire_counts(path, WireCounts(sent=10, received=20, connections=2), now_unix=1700000000.1234)
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {
        "sent": 10, "received": 20, "connections": 2, "updated_unix": 1700000000.123
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["wire.json"]  # no temporary file left
    assert load_wire_counts(path) == WireCounts(sent=10, received=20, connections=2)


def test_a_missing_wire_json_counts_from_zero(tmp_path: Path) -> None:
    assert load_wire_counts(tmp_path / "wire.json") == WireCounts()


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"sent": 1, "received": 2}', '{"sent": -1, "received": 2, "connections": 0}',
    '{"sent": "1", "received": 2, "connections": 0}', '{"sent": 1.5, "received": 2, "connections": 0}',
])
def test_a_malformed_wire_json_counts_from_zero_with_a_warning(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "wire.json"
    path.write_text(text)
    assert load_wire_counts(path) == WireCounts()
    assert "unusable wire counts" in caplog.text and str(path) in caplog.text


def test_the_recorder_counts_on_from_the_file_and_writes_while_traffic_flows(tmp_path: Path) -> None:
    path = tmp_path / "wire.json"
    write_wire_counts(path, WireCounts(sent=100, received=200, connections=3), now_unix=1.0)
    meter = WireMeter()
    with WireRecorder(meter, path, every_s=0.05, clock=lambda: 2.0):
        assert meter.counts() == WireCounts(sent=100, received=200, connections=3)
        meter.count_sent(5)
        deadline = time.monotonic() + 5
        while json.loads(path.read_text())["sent"] != 105:
            assert time.monotonic() < deadline, "not written while running"
            time.sleep(0.01)
        meter.count_received(1)
        meter.count_connection()
    # The final write at exit, whatever the period.
    assert json.loads(path.read_text()) == {
        "sent": 105, "received": 201, "connections": 4, "updated_unix": 2.0
    }
    # A restart counts on.
    again = WireMeter()
    with WireRecorder(again, path, every_s=60):
        again.count_sent(1)
    assert load_wire_counts(path) == WireCounts(sent=106, received=201, connections=4)


def test_the_recorder_writes_only_when_the_counts_changed(tmp_path: Path) -> None:
    path = tmp_path / "wire.json"
    meter = WireMeter()
    ticks = iter(range(1, 100))
    recorder = WireRecorder(meter, path, every_s=60, clock=lambda: float(next(ticks)))
    recorder.write()
    recorder.write()
    assert json.loads(path.read_text())["updated_unix"] == 1.0
    meter.count_sent(1)
    recorder.write()
    assert json.loads(path.read_text())["updated_unix"] == 2.0


def test_the_recorder_survives_a_file_it_cannot_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "gone"
    meter = WireMeter()
    recorder = WireRecorder(meter, folder / "wire.json", every_s=60)
    meter.count_sent(1)
    recorder.write()
    meter.count_sent(1)
    recorder.write()
    assert caplog.text.count("cannot write the wire counts") == 1  # once, not every second
    folder.mkdir()
    recorder.write()
    assert load_wire_counts(folder / "wire.json") == WireCounts(sent=2)


@pytest.mark.parametrize("every_s", [0.0, -1.0, float("nan"), float("inf")])
def test_the_recorder_refuses_a_bad_period(tmp_path: Path, every_s: float) -> None:
    with pytest.raises(ValueError, match=f"every_s must be a positive finite number, got {every_s}"):
        WireRecorder(WireMeter(), tmp_path / "wire.json", every_s=every_s)


def test_the_textfile_exports_the_wire_bytes_by_direction(tmp_path: Path) -> None:
    path = tmp_path / "fedge.prom"
    write_textfile(path, {
        "fedge_agent_events_queued": 2.0,
        'fedge_agent_wire_bytes_total{direction="up"}': 10.0,
        'fedge_agent_wire_bytes_total{direction="down"}': 20.0,
    })
    lines = path.read_text().splitlines()
    assert lines[3:] == [
        "# HELP fedge_agent_wire_bytes_total Bytes the agent's sockets sent (up) and received (down), "
        "TLS included",
        "# TYPE fedge_agent_wire_bytes_total counter",
        'fedge_agent_wire_bytes_total{direction="up"} 10.0',
        'fedge_agent_wire_bytes_total{direction="down"} 20.0',
    ]

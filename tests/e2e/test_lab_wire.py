"""The wire meter against the kernel's counters of a veth link, as ``fedge lab`` compares them.

A network namespace and a veth pair as the lab makes them (IPv6 off), a TLS
server on the host end, and a metered :class:`~fedge.transport.http.HttpTransport`
in a child process inside the namespace. The host end's ``rx``/``tx``
counters hold whole Ethernet frames; less 66 bytes a frame (Ethernet 14,
IPv4 20, TCP 20 + 12 of timestamp option) they are the TCP payload the meter
counts, up to the handful of frames of another size (a SYN's longer options,
an ARP exchange). A skb the stack sends as one GSO super-frame is counted
once with one header on the veth, so the rule holds for bulk transfers too.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedge import pki
from fedge.transport.tls import server_ssl_context

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]

_FRAME_OVERHEAD = 14 + 20 + 32
# SYNs (8 bytes more each), ARP frames (24 less each): a few per connection.
_ODD_FRAMES_BYTES = 64


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._reply(b"x" * (3_000_000 if self.path == "/big" else 300))

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(b"ok")

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def link() -> Iterator[tuple[str, str, str]]:
    """(namespace, host end, host address): a /24 of its own, torn down afterwards."""
    tag = os.getpid() % 100000
    ns, host, device = f"fedge-wiretest-{tag}", f"fw{tag}h", f"fw{tag}d"
    subnet = f"10.251.{tag % 250}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host, "type", "veth", "peer", "name", device)
        _ip("link", "set", device, "netns", ns)
        Path(f"/proc/sys/net/ipv6/conf/{host}/disable_ipv6").write_text("1")
        _ip("netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{device}.disable_ipv6=1")
        _ip("addr", "add", f"{subnet}.1/24", "dev", host)
        _ip("link", "set", host, "up")
        _ip("-n", ns, "addr", "add", f"{subnet}.2/24", "dev", device)
        _ip("-n", ns, "link", "set", device, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, host, f"{subnet}.1"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", host], check=False, capture_output=True, timeout=30)


def _counters(dev: str) -> dict[str, int]:
    stats = Path("/sys/class/net") / dev / "statistics"
    names = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")
    return {name: int((stats / name).read_text()) for name in names}


def test_the_meter_agrees_with_the_kernel_counters_of_the_veth(
    link: tuple[str, str, str], tmp_path: Path
) -> None:
    ns, host, address = link
    now = dt.datetime.now(dt.UTC)
    ca = pki.create_ca(now=now - dt.timedelta(minutes=5))
    cert, key = pki.issue_server_cert(ca, hosts=["localhost"], ips=[address], now=now)
    for name, data in (("ca.crt", pki.cert_pem(ca.cert)), ("server.crt", pki.cert_pem(cert))):
        pki.write_pem(tmp_path / name, data)
    pki.write_private_key(tmp_path / "server.key", key)
    httpd = ThreadingHTTPServer((address, 0), _Handler)
    httpd.daemon_threads = True
    context = server_ssl_context(cert_file=tmp_path / "server.crt", key_file=tmp_path / "server.key",
                                 ca_file=tmp_path / "ca.crt")
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    client = textwrap.dedent(f"""
        import json
        from fedge.transport.http import HttpTransport
        from fedge.transport.meter import WireMeter
        from fedge.transport.tls import client_ssl_context
        meter = WireMeter()
        url = "https://{address}:{httpd.server_address[1]}"
        for _ in range(2):  # two connections, handshakes and certificates included
            context = client_ssl_context(ca_file={str(tmp_path / "ca.crt")!r})
            with HttpTransport(url, verify=context, trust_env=False, meter=meter) as t:
                for _ in range(20):
                    t.request("GET", "/small", headers={{}}, timeout_s=10)
                t.request("GET", "/big", headers={{}}, timeout_s=10)
                t.request("POST", "/up", headers={{}}, content=b"y" * 2_000_000, timeout_s=10)
        c = meter.counts()
        print(json.dumps({{"sent": c.sent, "received": c.received, "connections": c.connections}}))
    """)
    try:
        before = _counters(host)
        run = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", client],
                             capture_output=True, text=True, timeout=120, check=False)
        after = _counters(host)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert run.returncode == 0, run.stderr
    counted = json.loads(run.stdout)
    delta = {k: after[k] - before[k] for k in after}
    # The host end receives what the device sent, and transmits what it received.
    up = delta["rx_bytes"] - _FRAME_OVERHEAD * delta["rx_packets"]
    down = delta["tx_bytes"] - _FRAME_OVERHEAD * delta["tx_packets"]
    # The server's close_notify answers (24 bytes a connection) reach the device after it closed.
    assert abs(up - counted["sent"]) <= _ODD_FRAMES_BYTES, (counted, delta)
    late = 24 * counted["connections"]
    assert abs(down - counted["received"]) <= _ODD_FRAMES_BYTES + late, (counted, delta)
    assert counted["connections"] == 2 and counted["sent"] > 4_000_000 and counted["received"] > 6_000_000

"""The wire meter's cost: a 10 MB download over TLS, with and without the meter.

The meter does TLS itself over memory BIOs (:mod:`fedge.transport.meter`),
so its cost is the extra copies between the BIOs and the socket and the
counting; this bench measures it where it shows most, a large download on
loopback (on a real link, the link is the bottleneck). A TLS server
(``http.server`` with the fedge server context, a certificate from a fresh
CA) runs in a child process and answers ``GET /bytes`` with ``--size`` bytes;
this process downloads it ``--repeats`` times through an
:class:`~fedge.transport.http.HttpTransport` with a
:class:`~fedge.transport.meter.WireMeter` and as many times without one,
alternating, on a fresh connection each time (handshake included), and
reports per mode the median wall time and the median CPU time of this process
(the client's work; the server's is in the child). It also checks that the
meter counted at least the payload.

Run: ``.venv/bin/python bench/wire_meter.py [--size 10000000] [--repeats 15] [--plain]``
(``--plain``: http://, where the meter only counts at recv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import statistics
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _common import machine
from fedge import pki
from fedge.transport.http import HttpTransport
from fedge.transport.meter import WireMeter
from fedge.transport.tls import client_ssl_context, server_ssl_context


def _serve(folder: str, size: int, plain: bool, ready: multiprocessing.Queue[int]) -> None:
    body = b"x" * size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    d = Path(folder)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = server_ssl_context(cert_file=d / "server.crt", key_file=d / "server.key", ca_file=d / "ca.crt")
    if not plain:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    ready.put(httpd.server_address[1])
    httpd.serve_forever()


def _download(url: str, ca: Path, size: int, meter: WireMeter | None) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with HttpTransport(url, verify=client_ssl_context(ca_file=ca), trust_env=False, meter=meter) as t:
        r = t.request("GET", "/bytes", headers={}, timeout_s=30.0)
    assert r.status == 200 and len(r.body) == size
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--plain", action="store_true", help="plain http:// instead of TLS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        d = Path(folder)
        ca = pki.create_ca(now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        now = dt.datetime.now(dt.UTC)
        cert, key = pki.issue_server_cert(ca, hosts=["localhost"], ips=["127.0.0.1"], now=now)
        pki.write_pem(d / "ca.crt", pki.cert_pem(ca.cert))
        pki.write_pem(d / "server.crt", pki.cert_pem(cert))
        pki.write_private_key(d / "server.key", key)
        ready: multiprocessing.Queue[int] = multiprocessing.Queue()
        server = multiprocessing.Process(
            target=_serve, args=(folder, args.size, args.plain, ready), daemon=True
        )
        server.start()
        try:
            url = f"{'http' if args.plain else 'https'}://127.0.0.1:{ready.get(timeout=30)}"
            _download(url, d / "ca.crt", args.size, None)  # warm up both sides
            runs: dict[str, list[tuple[float, float]]] = {"httpx": [], "metered": []}
            meter = WireMeter()
            for _ in range(args.repeats):
                runs["httpx"].append(_download(url, d / "ca.crt", args.size, None))
                runs["metered"].append(_download(url, d / "ca.crt", args.size, meter))
        finally:
            server.terminate()
            server.join(10)
    assert meter.received >= args.repeats * args.size
    result: dict[str, object] = {
        "machine": machine(), "scheme": url.partition(":")[0], "size_bytes": args.size,
        "repeats": args.repeats,
    }
    for mode, samples in runs.items():
        result[f"{mode}_wall_s_median"] = round(statistics.median(s[0] for s in samples), 4)
        result[f"{mode}_cpu_s_median"] = round(statistics.median(s[1] for s in samples), 4)
    for kind in ("wall", "cpu"):
        base, metered = result[f"httpx_{kind}_s_median"], result[f"metered_{kind}_s_median"]
        assert isinstance(base, float) and isinstance(metered, float)
        result[f"overhead_{kind}_percent"] = round(100 * (metered - base) / base, 1)
    result["metered_bytes_per_download"] = meter.received // args.repeats
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

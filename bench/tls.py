"""What mutual TLS costs a check-in on loopback: a new connection per check-in, and keep-alive.

Starts two real ``fedge coordinator`` processes, one with mutual TLS (the
default: a CA, a server certificate, one device enrolled through
``POST /v1/enrol``) and one ``--insecure`` (plain HTTP), and times N
sequential check-ins of one device against each, from request sent to
answer read, with the stdlib's ``http.client`` (so the client adds as
little as possible):

* ``new connection``: a fresh TCP connection per check-in; for TLS that is a
  full handshake with the device's certificate, verified against the CA,
  plus the per-request revocation check in the store;
* ``keep-alive``: one connection for every check-in.

Target (security issue): the TLS handshake and certificate checks add
<= 5 ms p50 to a check-in on loopback.

    .venv/bin/python bench/tls.py [--requests 500]
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from _common import FEDGE, machine
from fedge import pki
from fedge.coordinator.identity import create_token, init_ca, issue_server, tls_files
from fedge.store import Store

CHECK_IN = json.dumps({"protocol": 1, "num_examples": 10}).encode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(tmp: Path, name: str, *, tls: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    store = tmp / name
    if tls:
        init_ca(store)
        issue_server(store, hosts=["localhost"], ips=["127.0.0.1"])
    cfg = tmp / f"{name}.toml"
    cfg.write_text(
        f"[task]\nnum_features = 64\nnum_classes = 10\n[rounds]\nmin_devices = 1000\nwait_s = 5.0\n"
        f'[server]\nport = {port}\ndata_dir = "{store}"\n'
        f'[security]\ninsecure = {"false" if tls else "true"}\n'
    )
    proc = subprocess.Popen(
        [FEDGE, "coordinator", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    verify: ssl.SSLContext | bool = pki.client_ssl_context(ca_file=tls_files(store).ca_cert) if tls else True
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/healthz"
    for _ in range(300):
        try:
            httpx.get(url, verify=verify, timeout=1.0)
            return proc, port
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"the {name} coordinator did not start")


def enrol(tmp: Path, port: int) -> ssl.SSLContext:
    store = tmp / "tls"
    ca_file = tls_files(store).ca_cert
    with Store(store) as s:
        token = create_token(s, expires_s=600.0, uses=1, device_id=None, now=time.time()).token
    key = pki.new_device_key()
    r = httpx.post(
        f"https://127.0.0.1:{port}/v1/enrol",
        verify=pki.client_ssl_context(ca_file=ca_file),
        json={"protocol": 1, "token": token, "csr_pem": pki.make_csr(key, "bench-0").decode()},
    )
    r.raise_for_status()
    (tmp / "bench.crt").write_text(r.json()["certificate_pem"])
    pki.write_private_key(tmp / "bench.key", key)
    return pki.client_ssl_context(ca_file=ca_file, cert_file=tmp / "bench.crt", key_file=tmp / "bench.key")


def check_in(conn: http.client.HTTPConnection) -> float:
    t0 = time.perf_counter()
    conn.request(
        "POST",
        "/v1/check-in",
        body=CHECK_IN,
        headers={"content-type": "application/json", "x-fedge-device": "bench-0"},
    )
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - t0
    if response.status != 200:
        raise SystemExit(f"check-in answered {response.status}")
    return elapsed


def measure(port: int, context: ssl.SSLContext | None, n: int, *, keep_alive: bool) -> list[float]:
    def connect() -> http.client.HTTPConnection:
        if context is None:
            return http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)

    times = []
    conn = connect()
    for _ in range(n):
        if not keep_alive:
            conn.close()
            conn = connect()
        times.append(check_in(conn))
    conn.close()
    return times[5:]  # the first few warm caches on both sides


def summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    result: dict[str, Any] = {"requests": args.requests, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        plain, plain_port = start(tmp, "plain", tls=False)
        tls, tls_port = start(tmp, "tls", tls=True)
        try:
            context = enrol(tmp, tls_port)
            for keep_alive in (False, True):
                label = "keep_alive" if keep_alive else "new_connection"
                result[f"plain_{label}"] = summary(
                    measure(plain_port, None, args.requests, keep_alive=keep_alive)
                )
                result[f"tls_{label}"] = summary(
                    measure(tls_port, context, args.requests, keep_alive=keep_alive)
                )
            conn = http.client.HTTPSConnection("127.0.0.1", tls_port, context=context, timeout=10)
            conn.connect()
            result["tls_version"] = conn.sock.version() if isinstance(conn.sock, ssl.SSLSocket) else None
            conn.close()
        finally:
            for proc in (plain, tls):
                proc.terminate()
                proc.wait(30)
    print(json.dumps(result, indent=2))
    added = result["tls_new_connection"]["p50_ms"] - result["plain_new_connection"]["p50_ms"]
    print(
        f"mutual TLS adds {added:.2f} ms p50 to a check-in on a new connection (target <= 5 ms); keep-alive: "
        f"TLS {result['tls_keep_alive']['p50_ms']:.2f} ms vs plain "
        f"{result['plain_keep_alive']['p50_ms']:.2f} ms "
        f"p50 ({result['tls_version']})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

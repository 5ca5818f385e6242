"""Coordinator under load: 200 concurrent lightweight agents speaking the real protocol over loopback.

Starts ``fedge coordinator`` as its own process (logistic regression on
10,000 features x 10 classes: 100,010 float32 parameters), then runs N
virtual agents as asyncio tasks in this process, each with its own HTTP
keep-alive connection (a minimal HTTP/1.1 client: httpx would use more CPU
than the coordinator), doing what ``fedge agent`` does on the wire: check in, wait as
told, download the round's params (ETag), upload an update (a fixed random
delta, encoded once per round and sent by every agent, so that this process
spends its CPU on the protocol, not on training), check in again. Every agent is in every
round (cohort = N).

Measured, against the targets of the networked-federation issue:
* check-in latency (client-side, request sent to reply parsed), p50/p99 over
  every check-in of the run; target p99 < 100 ms;
* from the moment the last of the N uploads of a round is sent to the new
  checkpoint file existing on disk (polled every 1 ms): upload transfer,
  decoding, aggregation, the strategy step and the durable write; target
  <= 0.5 s;
* the coordinator's peak RSS (VmHWM from /proc); target <= 300 MB.

    .venv/bin/python bench/load.py [--agents 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from _common import FEDGE, machine
from fedge import pki
from fedge.coordinator.identity import create_token, init_ca, issue_server, tls_files
from fedge.store import Store
from fedge.wire import DEVICE_HEADER, decode_params, encode_update

FEATURES, CLASSES = int(os.environ.get("FEDGE_BENCH_FEATURES", "10000")), 10
WAIT_S = 1.0


def coordinator_toml(port: int, data_dir: Path, agents: int, rounds: int, *, tls: bool) -> str:
    return f"""
[task]
name = "logreg"
num_features = {FEATURES}
num_classes = {CLASSES}
[rounds]
count = {rounds}
cohort_size = {agents}
min_updates = {agents}
min_devices = {agents}
deadline_s = 300.0
wait_s = {WAIT_S}
[server]
port = {port}
data_dir = "{data_dir}"
[security]
insecure = {"false" if tls else "true"}
"""


class Stats:
    def __init__(self) -> None:
        self.check_in_s: list[float] = []
        self.check_in_at: list[float] = []
        self.last_sent: dict[int, float] = {}
        self.uploads: dict[int, int] = {}


class Connection:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams.

    httpx costs about a millisecond of CPU per request, so 200 httpx agents
    in one process saturate a core on their own and measure their own queue.
    This client does only what the protocol needs (Content-Length bodies).
    """

    def __init__(self, host: str, port: int, device: str, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.head = f"Host: {host}:{port}\r\n{DEVICE_HEADER}: {device}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", extra: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
        assert self.reader is not None
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\n{self.head}{extra}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


CHECK_IN = json.dumps({"protocol": 1, "num_examples": 100}).encode()


async def agent(
    i: int, port: int, stats: Stats, bodies: dict[tuple[int, int], bytes], *, lockstep: bool,
    tls: ssl.SSLContext | None = None,
) -> None:
    conn = Connection("127.0.0.1", port, f"load-{i}", tls)
    rng = np.random.default_rng(i)
    etag = None
    # Independent devices are not in lockstep: each starts somewhere within
    # one check-in period (a fleet's agents boot at different times).
    # --lockstep starts them all at once instead: the worst case.
    await asyncio.sleep(0.0 if lockstep else rng.uniform(0.0, WAIT_S))
    try:
        while True:
            t0 = time.perf_counter()
            status, _, data = await conn.request(
                "POST", "/v1/check-in", CHECK_IN, "Content-Type: application/json\r\n"
            )
            stats.check_in_s.append(time.perf_counter() - t0)
            stats.check_in_at.append(time.time())
            reply = json.loads(data)
            if reply["action"] == "done":
                return
            if reply["action"] == "wait":
                await asyncio.sleep(reply["wait_s"] * (0.9 + 0.2 * rng.random()))
                continue
            plan = reply["plan"]
            rnd, attempt = plan["round"], plan["attempt"]
            status, headers, data = await conn.request(
                "GET", f"/v1/rounds/{rnd}/params", extra=f"If-None-Match: {etag}\r\n" if etag else ""
            )
            etag = headers.get("etag")
            key = (rnd, attempt)
            if key not in bodies:  # one update body per round, shared: this process must stay light
                params, _ = decode_params(data, spec=None, max_bytes=1 << 30)
                delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(v.dtype) for k, v in params.items()}
                bodies[key] = encode_update(delta, round=rnd, attempt=attempt, num_examples=100)
            sent = time.time()
            status, _, data = await conn.request(
                "POST", f"/v1/rounds/{rnd}/update", bodies[key], "Content-Type: application/octet-stream\r\n"
            )
            if status != 200:
                raise SystemExit(f"upload refused: {data!r}")
            stats.uploads[rnd] = stats.uploads.get(rnd, 0) + 1
            stats.last_sent[rnd] = max(sent, stats.last_sent.get(rnd, 0.0))
    finally:
        await conn.close()


def watch_checkpoints(ckpt_dir: Path, rounds: int, seen: dict[int, float], done: threading.Event) -> None:
    while not done.is_set() and len(seen) < rounds:
        for r in range(1, rounds + 1):
            if r not in seen and (ckpt_dir / f"round-{r:06d}.safetensors").exists():
                seen[r] = time.time()
        time.sleep(0.001)


def enrol_all(store: Path, url: str, agents: int, tmp: Path) -> list[ssl.SSLContext | None]:
    """Enrol every virtual agent for real (token, CSR, POST /v1/enrol); their mutual-TLS contexts."""
    ca_file = tls_files(store).ca_cert
    with Store(store) as s:
        token = create_token(s, expires_s=3600.0, uses=agents, device_id=None, now=time.time()).token
    contexts: list[ssl.SSLContext | None] = []
    with httpx.Client(verify=pki.client_ssl_context(ca_file=ca_file)) as client:
        for i in range(agents):
            key = pki.new_device_key()
            csr = pki.make_csr(key, f"load-{i}").decode()
            r = client.post(f"{url}/v1/enrol", json={"protocol": 1, "token": token, "csr_pem": csr})
            r.raise_for_status()
            cert, key_file = tmp / f"load-{i}.crt", tmp / f"load-{i}.key"
            cert.write_text(r.json()["certificate_pem"])
            pki.write_private_key(key_file, key)
            contexts.append(pki.client_ssl_context(ca_file=ca_file, cert_file=cert, key_file=key_file))
    return contexts


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port = 18000 + os.getpid() % 1000
        cfg = Path(tmp) / "coordinator.toml"
        store = Path(tmp) / "store"
        cfg.write_text(coordinator_toml(port, store, args.agents, args.rounds, tls=args.tls))
        if args.tls:
            init_ca(store)
            issue_server(store, hosts=["localhost"], ips=["127.0.0.1"])
        prefix = os.environ.get("FEDGE_BENCH_PREFIX", "").split()
        log = (Path(tmp) / "log").open("wb")  # closed with the process below
        proc = subprocess.Popen(
            [*prefix, FEDGE, "coordinator", "--config", str(cfg), "--exit-when-done"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        url = f"{'https' if args.tls else 'http'}://127.0.0.1:{port}"
        verify: ssl.SSLContext | bool = True
        if args.tls:
            verify = pki.client_ssl_context(ca_file=tls_files(store).ca_cert)
        try:
            for _ in range(200):
                try:
                    httpx.get(f"{url}/healthz", timeout=1.0, verify=verify)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            contexts = enrol_all(store, url, args.agents, Path(tmp)) if args.tls else [None] * args.agents
            rss_before = rss_mb(proc.pid)
            stats = Stats()
            seen: dict[int, float] = {}
            done = threading.Event()
            watcher = threading.Thread(
                target=watch_checkpoints, args=(Path(tmp) / "store" / "checkpoints", args.rounds, seen, done)
            )
            watcher.start()
            cpu_start = cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            bodies: dict[tuple[int, int], bytes] = {}
            await asyncio.gather(
                *(agent(i, port, stats, bodies, lockstep=args.lockstep, tls=contexts[i])
                  for i in range(args.agents))
            )
            wall = time.perf_counter() - t0
            done.set()
            watcher.join()
            rss = peak_rss_mb(proc.pid)
            cpu_s = cpu_seconds(proc.pid) - cpu_start
            if os.environ.get("FEDGE_BENCH_TRACE"):
                Path(os.environ["FEDGE_BENCH_TRACE"]).write_text(
                    json.dumps(
                        {
                            "check_in": list(zip(stats.check_in_at, stats.check_in_s, strict=True)),
                            "checkpoints": seen,
                            "last_sent": stats.last_sent,
                        }
                    )
                )
        finally:
            try:
                proc.wait(15)  # it exits by itself once the agents have heard "done"
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(30)
            log.close()
    lat = sorted(stats.check_in_s)
    to_disk = {r: seen[r] - stats.last_sent[r] for r in seen if r in stats.last_sent}
    return {
        "agents": args.agents,
        "lockstep": args.lockstep,
        "tls": args.tls,
        "rounds": args.rounds,
        "params": FEATURES * CLASSES + CLASSES,
        "check_ins": len(lat),
        "check_in_p50_ms": 1e3 * statistics.median(lat),
        "check_in_p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))],
        "check_in_max_ms": 1e3 * lat[-1],
        "uploads_per_round": stats.uploads,
        "last_upload_to_checkpoint_s": to_disk,
        "coordinator_peak_rss_mb": rss,
        "coordinator_rss_before_rounds_mb": rss_before,
        "coordinator_cpu_s_during_load": cpu_s,
        "load_generator_cpu_s": time.process_time(),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS: every agent enrols with a token first (the default is plain HTTP)")
    parser.add_argument("--lockstep", action="store_true",
                        help="start every agent at the same instant (default: spread over one wait_s)")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(main_async(args))
    result["machine"] = machine()
    print(json.dumps(result, indent=2))
    worst = max(result["last_upload_to_checkpoint_s"].values(), default=float("nan"))
    print(
        f"check-in p99 {result['check_in_p99_ms']:.1f} ms (target < 100); last upload -> checkpoint "
        f"{worst:.3f} s worst (target <= 0.5); coordinator peak RSS "
        f"{result['coordinator_peak_rss_mb']:.0f} MB "
        f"(target <= 300)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

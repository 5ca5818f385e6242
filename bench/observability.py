"""Observability costs: /metrics and the dashboard's data with a big store, and event ingestion.

1. A store with 1,000 devices (profiles as agents send them), 1,000 complete
   rounds and 5,000 events; a real coordinator process on it (plain HTTP on
   loopback); 300 requests each to ``/metrics`` and ``/v1/admin/dashboard``
   over one keep-alive connection: p50 and p99 latency (target: < 50 ms p99).
2. Event ingestion: 200 devices each sending a batch of 50 events a minute,
   spread over the minute, for 60 s; the coordinator's CPU time over that
   minute, as a share of one core (target: < 5%).

    .venv/bin/python bench/observability.py [--devices 1000] [--rounds 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from _common import FEDGE, machine
from fedge.store import Store
from fedge.strategies import ServerState
from fedge.wire import DEVICE_HEADER


def build_store(data_dir: Path, devices: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    with Store(data_dir) as store:
        for i in range(devices):
            profile = {"fedge_version": "0.1.0", "policy": "ok", "cores": 4, "arch": "aarch64",
                       "cpu_load": float(rng.random()), "memory_available_mb": 512.0, "examples_per_s": 120.0}
            store.upsert_device(f"dev-{i:05d}", now=time.time(), num_examples=100, profile=profile)
        params = {"weight": np.zeros((64, 10), np.float32), "bias": np.zeros(10, np.float32)}
        cohort = [f"dev-{i:05d}" for i in range(20)]
        for r in range(1, rounds + 1):
            attempt = store.open_round(r, cohort=cohort, min_updates=10, opened_at=r * 10.0,
                                       deadline_at=r * 10.0 + 60)
            store.complete_round(r, attempt, ServerState(params, round=r), closed_at=r * 10.0 + 5,
                                 reported=cohort, dropped=[], metrics={"accuracy": 0.9, "loss": 0.3})
        store.record_events("dev-00000", [(time.time(), "warning", "warning", f"event {k}", {})
                                          for k in range(5000)], received_at=time.time())


def percentiles(samples: list[float]) -> str:
    ms = sorted(1e3 * s for s in samples)
    p99 = ms[int(0.99 * (len(ms) - 1))]
    return f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_store(root / "store", a.devices, a.rounds)
        print(f"store: {a.devices} devices, {a.rounds} complete rounds, 5,000 events "
              f"(built in {time.perf_counter() - t0:.0f} s)")
        port = 18000 + os.getpid() % 1000
        config = root / "coordinator.toml"
        config.write_text(
            f'[task]\nname = "logreg"\nnum_features = 64\nnum_classes = 10\n'
            f'[rounds]\ncount = {a.rounds + 10}\n'
            f'cohort_size = 8\nwait_s = 5.0\n[server]\nport = {port}\ndata_dir = "{root / "store"}"\n'
            "[security]\ninsecure = true\n"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.Popen([FEDGE, "coordinator", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=10) as client:
                for _ in range(200):
                    try:
                        if client.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.1)
                for path in ("/metrics/", "/v1/admin/dashboard"):
                    client.get(path)
                    samples = []
                    for _ in range(300):
                        t = time.perf_counter()
                        r = client.get(path)
                        samples.append(time.perf_counter() - t)
                        assert r.status_code == 200, r.text[:200]
                    print(f"GET {path}: {percentiles(samples)} ({len(r.content) / 1024:.0f} KiB)")
                # Event ingestion: 200 devices x one 50-event batch a minute, spread over the minute.
                senders = 200
                batch = {"protocol": 1, "events": [{"at": time.time(), "kind": "warning", "level": "warning",
                                                    "message": "policy: cpu load 0.93 > 0.5"}] * 50}
                interval = a.seconds / senders
                cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
                sent = 0
                for i in range(senders):
                    target = wall0 + i * interval
                    time.sleep(max(0.0, target - time.perf_counter()))
                    r = client.post("/v1/events", json=batch, headers={DEVICE_HEADER: f"dev-{i:05d}"})
                    assert r.status_code == 200, r.text
                    sent += 50
                time.sleep(max(0.0, wall0 + a.seconds - time.perf_counter()))
                cpu = cpu_seconds(proc.pid) - cpu0
                wall = time.perf_counter() - wall0
                print(f"event ingestion: {sent} events from {senders} devices in {wall:.0f} s: "
                      f"coordinator CPU {cpu:.2f} s = {100 * cpu / wall:.2f}% of one core "
                      "(the idle coordinator included)")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())

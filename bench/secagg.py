"""Secure aggregation (SecAgg+) against the issue's targets.

1. round: a simulated round of 100 devices with a ~100K-parameter MLP
   (``mlp:1333`` on digits: 100,000 values), plaintext FedAvg against
   ``--secagg`` (every device's key agreement, sharing, masking; the server's
   unmasking), inline backend, no dropouts. Target: SecAgg+ <= 2x plaintext.
2. mask: one device's clip + quantize + masking of 1M values with 10
   neighbours (11 AES-CTR expansions into a preallocated buffer). Target <= 40 ms.
3. unmask: the coordinator's unmasking for 500 devices, 100K values, 30% of
   them dropped after sharing keys (their pairwise masks rebuilt) and, as a
   second case, 30% silent during unmasking. Target <= 1 s.
4. expansion: bytes a device uploads (keys, encrypted shares, its masked
   vector at ``wire_bits`` per value, unmask shares) over the 16-bit
   plaintext vector, 1,000 devices, 1M values. Target <= 1.8x.

Timings are medians of ``--repeat`` runs.

    .venv/bin/python bench/secagg.py [--only round,mask,unmask,expansion] [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import os

# As `fedge simulate` does: one BLAS thread (set before numpy is imported).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from _common import machine  # noqa: E402
from fedge.encoding.fixedpoint import FixedPoint  # noqa: E402
from fedge.secagg import shamir  # noqa: E402
from fedge.secagg.primitives import NONCE_BYTES  # noqa: E402
from fedge.secagg.protocol import (  # noqa: E402
    MaskingMaterial,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    apply_masks,
    default_parameters,
)


def _median(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_round(repeat: int) -> None:
    from fedge.sim.config import SimConfig
    from fedge.sim.engine import Simulation

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeat):  # alternate, so a busy spell on the machine hits both
        for secagg in (False, True):
            cfg = SimConfig(task="mlp:1333", devices=100, rounds=2, eval_every=100,
                            secagg=secagg)
            result = Simulation(cfg).run()
            times[secagg].append((result.timing["rounds_s"] - result.timing["eval_s"])
                                 / cfg.rounds)
    plain, secure = statistics.median(times[False]), statistics.median(times[True])
    print(f"round  100 devices, 100K params: plaintext {plain:.3f} s, secagg+ {secure:.3f} s "
          f"per round = {secure / plain:.2f}x")


def bench_mask(repeat: int) -> None:
    n_values, rng = 1_000_000, np.random.default_rng(0)
    material = MaskingMaterial(rng.bytes(32), tuple((rng.bytes(32), 1 - 2 * (i % 2))
                                                   for i in range(10)), n_values + 1)
    grid = FixedPoint(clip=1.0, bits=16, max_weight=1000, cohort_size=100)
    delta = rng.normal(0, 0.1, n_values).astype(np.float32)
    t = _median(lambda: apply_masks(material, grid.encode(delta, 500, rng)), repeat)
    t_mask = _median(lambda: apply_masks(material, np.zeros(n_values + 1, np.uint32)), repeat)
    print(f"mask   1M values, 10 neighbours: {1e3 * t:.1f} ms (masks alone {1e3 * t_mask:.1f} ms)")


def _unmask_case(n: int, length: int, *, drop_phase: str, frac: float, repeat: int) -> None:
    k, t = default_parameters(n, dropout_rate=frac)
    setup = RoundSetup(1, tuple(str(i) for i in range(n)), k, t, bytes(range(32)), length)
    rng = np.random.default_rng(1)
    clients = {d: SecAggClient(setup, d, random_bytes=rng.bytes) for d in setup.cohort}
    server = SecAggServer(setup)
    for d in setup.cohort:
        server.receive_keys(d, clients[d].advertise_keys())
    directory = server.close_keys()
    for d in setup.cohort:
        server.receive_shares(d, clients[d].share_keys(directory))
    inbox = server.close_shares()
    gone = set(setup.cohort[: int(frac * n)])
    for d in setup.cohort:
        if drop_phase == "upload" and d in gone:
            continue
        clients[d].receive_shares(inbox[d])
        server.receive_masked(d, clients[d].masked_input(np.zeros(length, np.uint32)))
    request = server.close_masked()
    for d in request.survivors:
        if not (drop_phase == "unmask" and d in gone):
            server.receive_unmask(d, clients[d].unmask(request))
    times = []
    for _ in range(repeat):
        fresh = copy.deepcopy(server)  # unmask() ends the round; time it on a copy
        t0 = time.perf_counter()
        total = fresh.unmask()
        times.append(time.perf_counter() - t0)
        if total.any():
            raise SystemExit("unmasked sum of zero inputs is not zero")
    when = "before upload" if drop_phase == "upload" else "during unmask"
    print(f"unmask {n} devices, {length // 1000}K values, k={k} t={t}, {int(frac * 100)}% "
          f"dropped {when}: {statistics.median(times):.3f} s")


def bench_unmask(repeat: int) -> None:
    _unmask_case(500, 100_000, drop_phase="upload", frac=0.3, repeat=repeat)
    _unmask_case(500, 100_000, drop_phase="unmask", frac=0.3, repeat=repeat)


def bench_expansion() -> None:
    n, length = 1000, 1_000_000
    k, _ = default_parameters(n)
    grid = FixedPoint(clip=1.0, bits=16, max_weight=1000, cohort_size=n)
    keys = 2 * 32
    share_ct = NONCE_BYTES + 16 + 16 + 2 * shamir.SHARE_BYTES
    masked = ((length + 1) * grid.wire_bits + 7) // 8
    unmask = k * shamir.SHARE_BYTES
    total = keys + k * share_ct + masked + unmask
    plain = 2 * length
    print(f"expansion 1000 devices, 1M values, k={k}: wire {grid.wire_bits} bits/value, "
          f"{total / 1e6:.3f} MB vs 16-bit plaintext {plain / 1e6:.3f} MB = {total / plain:.3f}x "
          f"(without packing, 32 bits/value: {(total - masked + 4 * (length + 1)) / plain:.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="round,mask,unmask,expansion")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    parts = args.only.split(",")
    if "mask" in parts:
        bench_mask(args.repeat)
    if "expansion" in parts:
        bench_expansion()
    if "unmask" in parts:
        bench_unmask(args.repeat)
    if "round" in parts:
        bench_round(args.repeat)


if __name__ == "__main__":
    main()

"""Secure aggregation over the network: a secure round against a plaintext round, and the coordinator's CPU.

1. demo: ``fedge demo`` (a real coordinator and 8 real agent processes,
   mutual TLS on 127.0.0.1, logistic regression on the digits, 20 rounds),
   plaintext and ``--secagg``, ``--repeat`` times each, alternating. Reported
   per mode: final accuracy, mean round duration, protocol overhead per round
   (duration minus the slowest device's training), bytes up and down per
   round (every request body the coordinator counted: for secure rounds the
   keys, shares and unmask messages and the masked frames; and the replies
   it sent: params, key directories, inboxes, unmask requests), and the
   coordinator process's CPU seconds per round (from ``/proc``, from its
   first answer to the end of the last round: start-up excluded).
2. coordinator: the coordinator's side of one secure round in-process
   (:class:`fedge.coordinator.secagg.SecureRound`: receiving keys, shares and
   masked vectors, closing the phases, unmasking, decoding) for ``n``
   devices and ``L`` values, with none or 10% of the devices dropped after
   sharing keys (their pairwise masks rebuilt). The devices' own work (their
   clients, in the same process) is not counted: CPU is ``time.process_time``
   around the coordinator's calls only (the unmasking thread included).

    .venv/bin/python bench/secagg_net.py [--only demo,coordinator] [--repeat 2] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os

# As `fedge simulate` does: one BLAS thread (set before numpy is imported).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from _common import machine  # noqa: E402
from fedge.coordinator.secagg import open_secure_round  # noqa: E402
from fedge.encoding.fixedpoint import pack, unpack  # noqa: E402
from fedge.params import ParamsSpec  # noqa: E402
from fedge.secagg.protocol import AdvertiseKeys, RoundSetup, SecAggClient, UnmaskRequest  # noqa: E402
from fedge.wire import SecAggKeys, SecAggShares, SecAggUnmaskShares  # noqa: E402


def bench_demo(repeat: int, rounds: int) -> None:
    from fedge.demo import run_demo

    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(repeat):
        for secure in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                r = run_demo(agents=8, rounds=rounds, out_dir=Path(tmp) / "demo", seed=0, secagg=secure)
            results[secure].append(r.summary)
    print(f"demo: 8 agents, {rounds} rounds, mutual TLS, {repeat} runs each (load {_load()})")
    print(f"{'mode':<10} {'accuracy':>9} {'round s':>8} {'overhead s':>11} {'KiB up/round':>13} "
          f"{'KiB down/round':>15} {'coord CPU s/round':>18}")
    for secure, runs in results.items():
        def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(float(s["timing"][key]) for s in runs)
        n = rounds
        up = statistics.median(s["bytes_up"] for s in runs) / n / 1024
        down = statistics.median(s["bytes_down"] for s in runs) / n / 1024
        acc = ", ".join(f"{s['accuracy']:.4f}" for s in runs)
        print(f"{'secagg' if secure else 'plaintext':<10} {acc:>9} {med('round_s_mean'):8.3f} "
              f"{med('protocol_overhead_s_per_round'):11.3f} {up:13.1f} {down:15.1f} "
              f"{med('coordinator_cpu_s_per_round'):18.4f}")


def _secure_round_cpu(n: int, length: int, drop: float, seed: int) -> tuple[float, float, int]:
    """(coordinator CPU seconds, wall seconds, k) of one secure round of ``n`` devices."""
    params = {"w": np.zeros(length - 1, np.float32)}
    rng = np.random.default_rng(seed)
    names = [f"d{i:04d}" for i in range(n)]
    cpu = 0.0

    async def run() -> tuple[float, float, int]:
        nonlocal cpu
        t_wall = time.perf_counter()
        c0 = time.process_time()
        secure = open_secure_round(
            round_id=1, attempt=1, cohort=names, num_examples=dict.fromkeys(names, 100), params=params,
            now=0.0, k=None, threshold=None, dropout_rate=max(drop, 0.1), clip=1.0, bits=None,
            max_weight=None, weighted=True, phases_s=(10.0, 10.0, 10.0), deadline_s=60.0, poll_s=1.0,
            wake=lambda: None,
        )
        cpu += time.process_time() - c0
        setup: RoundSetup = secure.setup
        clients = {d: SecAggClient(setup, d, random_bytes=np.random.default_rng([seed, i]).bytes)
                   for i, d in enumerate(names)}

        def timed(fn: Any, *args: Any) -> Any:
            nonlocal cpu
            c = time.process_time()
            out = fn(*args)
            cpu += time.process_time() - c
            return out

        async def advance() -> None:
            nonlocal cpu
            c = time.process_time()
            await secure.advance(0.0, aborted=(), target=n, min_updates=3)
            cpu += time.process_time() - c

        for d in names:
            k = clients[d].advertise_keys()
            timed(secure.receive_keys, d, SecAggKeys(round=1, attempt=1, c_pk=k.c_pk, s_pk=k.s_pk))
        await advance()
        directories = {d: timed(secure.directory, d, 1) for d in names}
        for d in names:
            dir_ = {m: AdvertiseKeys(p.c_pk, p.s_pk) for m, p in directories[d].keys.items()}
            sh = clients[d].share_keys(dir_)
            timed(secure.receive_shares, d, SecAggShares(round=1, attempt=1, shares=dict(sh.ciphertexts)))
        await advance()
        gone = set(names[: int(drop * n)])
        bits = secure.grid.wire_bits
        for d in names:
            inbox = timed(secure.inbox, d, 1)
            clients[d].receive_shares(inbox.shares)
            if d in gone:
                continue
            x = secure.grid.encode(rng.uniform(-0.1, 0.1, length - 1), 100, rng)
            frame = pack(clients[d].masked_input(x).vector, bits)
            vec = timed(unpack, frame, bits, length)  # the coordinator's decode of the frame
            timed(secure.receive_masked, d, 1, vec)
        # The upload phase closes at its deadline when devices dropped: move the clock there.
        c = time.process_time()
        await secure.advance(60.0 if gone else 0.0, aborted=(), target=n, min_updates=3)
        cpu += time.process_time() - c
        for d in names:
            if d in gone:
                continue
            req = timed(secure.unmask_request, d, 1)
            sh = clients[d].unmask(UnmaskRequest(tuple(req.survivors), tuple(req.dropped)))
            timed(secure.receive_unmask, d, SecAggUnmaskShares(round=1, attempt=1,
                                                               self_shares=dict(sh.self_shares),
                                                               key_shares=dict(sh.key_shares)))
        c = time.process_time()
        await secure.advance(60.0, aborted=(), target=n, min_updates=3)
        secure.aggregate(ParamsSpec.of(params))
        cpu += time.process_time() - c  # process-wide: the unmasking's worker thread included
        assert secure.total is not None, secure.abort_reason
        return cpu, time.perf_counter() - t_wall, setup.k

    return asyncio.run(run())


def bench_coordinator(repeat: int) -> None:
    print(f"coordinator side of one secure round, in-process (load {_load()}); CPU = process_time around "
          "the coordinator's calls, median of runs")
    print(f"{'devices':>7} {'values':>9} {'dropped':>8} {'k':>4} {'coord CPU s':>12}")
    for n, length, drop in ((8, 651, 0.0), (8, 100_001, 0.0), (50, 100_001, 0.0), (50, 100_001, 0.1)):
        runs = [_secure_round_cpu(n, length, drop, seed) for seed in range(repeat)]
        k = runs[0][2]
        print(f"{n:>7} {length:>9,} {int(drop * n):>8} {k:>4} {statistics.median(r[0] for r in runs):12.4f}")


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="demo,coordinator")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(machine())
    only = set(args.only.split(","))
    if "coordinator" in only:
        bench_coordinator(args.repeat)
    if "demo" in only:
        bench_demo(args.repeat, args.rounds)


if __name__ == "__main__":
    main()

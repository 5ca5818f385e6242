"""Secure aggregation (SecAgg+) against the issue's targets.

0. bound: this machine's primitive costs through ``cryptography`` (X25519,
   HKDF, AES-GCM, AES-CTR keystream, a uint32 add, Shamir), and from them the
   least the protocol's crypto can cost for the round of part 1 and the
   unmasking of part 3 (every X25519 exchange, keystream byte, share and
   Lagrange set the protocol needs, nothing else).
1. round: a simulated round of 100 devices with a ~100K-parameter MLP
   (``mlp:1333`` on digits: 100,000 values), plaintext FedAvg against
   ``--secagg`` (every device's key agreement, sharing, masking; the server's
   unmasking), no dropouts, ``inline`` and ``processes`` (2 workers); each
   round's time is the median over rounds 2..6 (round 1 pays lazy imports),
   and CPU time is given for the driver and for the workers. Both runs use
   ``--count-bytes off``: the secure round computes its upload size, the
   plaintext one would otherwise serialize and zstd-compress every update
   (shown apart). ``--epochs 5`` prices local training at 5 epochs.
   Target: SecAgg+ <= 2x plaintext.
2. mask: one device's clip + quantize + masking of 1M values with 10
   neighbours (11 AES-CTR expansions into a preallocated buffer). Target <= 40 ms.
3. unmask: the coordinator's unmasking for 500 devices, 100K values, 30% of
   them dropped after sharing keys (their pairwise masks rebuilt) and, as a
   second case, 30% silent during unmasking. Target <= 1 s.
4. expansion: bytes a device uploads (keys, encrypted shares, its masked
   vector at ``wire_bits`` per value, unmask shares) over the 16-bit
   plaintext vector, 1,000 devices, 1M values. Target <= 1.8x.

Timings are medians of ``--repeat`` runs.

    PYTHONPATH=src .venv/bin/python bench/secagg.py [--only bound,round,mask,unmask,expansion]
        [--repeat 3] [--epochs 1]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import resource

# As `fedge simulate` does: one BLAS thread (set before numpy is imported).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from _common import machine  # noqa: E402
from fedge.encoding.fixedpoint import FixedPoint  # noqa: E402
from fedge.secagg import shamir  # noqa: E402
from fedge.secagg.primitives import (  # noqa: E402
    INFO_MASK_SEED,
    NONCE_BYTES,
    agree,
    decrypt_share,
    derive_key,
    encrypt_share,
    load_private,
    public_key,
)
from fedge.secagg.protocol import (  # noqa: E402
    MaskingMaterial,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    apply_masks,
    default_parameters,
)


def _median(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``repeat`` calls."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _cpu_s(fn: Callable[[], object], n: int) -> float:
    """CPU seconds per call of ``fn`` (best of 3 batches of ``n``): the machine is shared."""
    best = math.inf
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best


def primitive_costs() -> dict[str, float]:
    """Seconds per operation, as the protocol calls them (CPU time, best of 3)."""
    rng = np.random.default_rng(0)
    sk, peer = load_private(rng.bytes(32)), public_key(rng.bytes(32))
    key, salt, length = rng.bytes(32), rng.bytes(48), 100_001
    plain = rng.bytes(16 + 2 * shamir.SHARE_BYTES)
    blob = encrypt_share(key, rng.bytes(12), plain, round_id=1, sender=1, receiver=2)
    buf, acc = np.empty(length, np.uint32), np.zeros(length, np.uint32)
    zeros, out = memoryview(bytes(4 * length)), buf.data.cast("B")
    rand = rng.bytes
    private, nonce = rand(32), rand(12)
    k, t = default_parameters(100)
    shares = shamir.split(rng.bytes(32), xs=list(range(1, k + 1)), threshold=t, random_bytes=rand)
    xs_many = [tuple(sorted(rng.choice(np.arange(1, 101), t, replace=False).tolist()))
               for _ in range(50)]
    lagrange = iter(xs_many * 10)
    return {
        "x25519": _cpu_s(lambda: agree(sk, peer), 2000),
        "keygen": _cpu_s(lambda: public_key(load_private(private)), 500),
        "hkdf": _cpu_s(lambda: derive_key(key, info=INFO_MASK_SEED, salt=salt), 2000),
        "gcm_enc": _cpu_s(lambda: encrypt_share(key, nonce, plain, round_id=1, sender=1,
                                                receiver=2), 2000),
        "gcm_dec": _cpu_s(lambda: decrypt_share(key, blob, round_id=1, sender=1, receiver=2), 2000),
        "aes_key": _cpu_s(lambda: Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor(), 2000),
        "keystream_per_byte": _cpu_s(
            lambda: Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(
                zeros, out), 200) / (4 * length),
        "add_per_value": _cpu_s(lambda: np.add(acc, buf, out=acc), 500) / length,
        f"split_t{t}_k{k}": _cpu_s(lambda: shamir.split(key, xs=list(range(1, k + 1)), threshold=t,
                                                       random_bytes=rand), 100),
        f"lagrange_t{t}": _cpu_s(lambda: shamir._lagrange_at_zero.__wrapped__(next(lagrange)), 50),
        f"reconstruct_t{t}": _cpu_s(lambda: shamir.reconstruct(shares, threshold=t), 200),
        "reconstruct_per_share": _cpu_s(lambda: shamir.reconstruct(shares, threshold=t), 200) / t,
    }


def round_bound(costs: dict[str, float], n: int, length: int) -> dict[str, float]:
    """The least the crypto of one no-dropout SecAgg+ round costs, by part, in seconds."""
    k, t = default_parameters(n)
    per_device = {
        "X25519 (2 keys, 2k agreements)": 2 * costs["keygen"] + 2 * k * costs["x25519"],
        "HKDF (2k keys)": 2 * k * costs["hkdf"],
        "AES-GCM (k out, k in)": k * (costs["gcm_enc"] + costs["gcm_dec"]),
        "Shamir split (b, s_sk)": 2 * costs[f"split_t{t}_k{k}"],
        "AES-CTR keystream ((k+1) x 4L)": (k + 1) * 4 * length * costs["keystream_per_byte"],
        "AES key setup (k+1 seeds)": (k + 1) * costs["aes_key"],
        "mask adds ((k+1) x L)": (k + 1) * length * costs["add_per_value"],
    }
    out = {name: n * v for name, v in per_device.items()}
    out["server: Lagrange + reconstruct (n secrets)"] = n * (
        costs[f"lagrange_t{t}"] + costs[f"reconstruct_t{t}"])
    out["server: self-masks (n x 4L keystream + adds)"] = n * (costs["aes_key"] + length * (
        4 * costs["keystream_per_byte"] + costs["add_per_value"]))
    return out


def bench_bound() -> None:
    costs = primitive_costs()
    n, length = 100, 100_001
    k, t = default_parameters(n)
    print(f"bound  primitives (CPU, best of 3): X25519 agreement {1e6 * costs['x25519']:.1f} us, "
          f"key generation {1e6 * costs['keygen']:.1f} us, HKDF {1e6 * costs['hkdf']:.1f} us, "
          f"AES-GCM share {1e6 * costs['gcm_enc']:.1f}/{1e6 * costs['gcm_dec']:.1f} us, "
          f"AES key setup {1e6 * costs['aes_key']:.1f} us, "
          f"AES-CTR {1e-9 / costs['keystream_per_byte']:.2f} GB/s, uint32 add "
          f"{1e-9 / costs['add_per_value']:.2f} Gvalues/s, Shamir split (t={t}, k={k}) "
          f"{1e6 * costs[f'split_t{t}_k{k}']:.0f} us, Lagrange set {1e6 * costs[f'lagrange_t{t}']:.0f}"
          f" us, reconstruct {1e6 * costs[f'reconstruct_t{t}']:.0f} us")
    parts = round_bound(costs, n, length)
    total = sum(parts.values())
    print(f"bound  round, {n} devices, L = {length} (k={k}, t={t}), no dropouts: "
          f"{total:.3f} s of crypto on one core, {total / 2:.3f} s on two:")
    for name, v in parts.items():
        print(f"         {name}: {v:.3f} s")


def bench_round(repeat: int, epochs: int) -> None:
    from fedge.sim.config import SimConfig
    from fedge.sim.engine import Simulation

    rounds = 6
    for backend in ("inline", "processes"):
        runs: dict[tuple[bool, str], list[tuple[float, float, float]]] = {}
        for _ in range(repeat):  # alternate, so a busy spell on the machine hits all
            for secagg, count in ((False, "off"), (True, "off"), (False, "wire")):
                cfg = SimConfig(task="mlp:1333", devices=100, rounds=rounds, eval_every=100,
                                secagg=secagg, count_bytes=count, backend=backend, workers=2,
                                local_epochs=epochs)
                sim = Simulation(cfg)
                cpu0 = time.process_time()
                kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                result = sim.run()  # the workers are joined when it returns
                kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                ends = [r.elapsed_s for r in result.history]
                per_round = statistics.median(b - a for a, b in itertools.pairwise(ends))
                workers = (kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime)
                runs.setdefault((secagg, count), []).append(
                    (per_round, (time.process_time() - cpu0) / rounds, workers / rounds))
        med = {key: [statistics.median(v[i] for v in vals) for i in range(3)]
               for key, vals in runs.items()}
        (plain, p_cpu, p_kids), (secure, s_cpu, s_kids) = med[(False, "off")], med[(True, "off")]
        wire = med[(False, "wire")][0]
        cpu_note = "" if backend == "inline" else (
            f"; CPU per round, driver + workers: plaintext {p_cpu:.3f} + {p_kids:.3f} s, "
            f"secagg+ {s_cpu:.3f} + {s_kids:.3f} s")
        print(f"round  {backend}, 100 devices, 100K params, {epochs} local epoch(s): plaintext "
              f"{plain:.3f} s, secagg+ {secure:.3f} s per round = {secure / plain:.2f}x "
              f"(plaintext with --count-bytes wire: {wire:.3f} s){cpu_note}")


def bench_mask(repeat: int) -> None:
    n_values, rng = 1_000_000, np.random.default_rng(0)
    material = MaskingMaterial(rng.bytes(32), tuple((rng.bytes(32), 1 - 2 * (i % 2))
                                                   for i in range(10)), n_values + 1)
    grid = FixedPoint(clip=1.0, bits=16, max_weight=1000, cohort_size=100)
    delta = rng.normal(0, 0.1, n_values).astype(np.float32)
    t, c = _median(lambda: apply_masks(material, grid.encode(delta, 500, rng)), repeat)
    t_mask, c_mask = _median(lambda: apply_masks(material, np.zeros(n_values + 1, np.uint32)), repeat)
    print(f"mask   1M values, 10 neighbours: {1e3 * t:.1f} ms wall, {1e3 * c:.1f} ms CPU "
          f"(masks alone {1e3 * t_mask:.1f} ms wall, {1e3 * c_mask:.1f} ms CPU)")


def _unmask_bound(costs: dict[str, float], setup: RoundSetup, gone: set[str], drop_phase: str,
                  length: int) -> float:
    """The least the coordinator's unmasking can cost: every secret rebuilt, every mask regenerated."""
    rng = np.random.default_rng(2)
    n, t = len(setup.cohort), setup.threshold
    sets = [tuple(sorted(rng.choice(np.arange(1, n + 1), t, replace=False).tolist()))
            for _ in range(20)]
    lagrange = iter(sets * 3)
    per_secret = _cpu_s(lambda: shamir._lagrange_at_zero.__wrapped__(next(lagrange)), 20)
    per_secret += costs["reconstruct_per_share"] * t
    mask = costs["aes_key"] + length * (4 * costs["keystream_per_byte"] + costs["add_per_value"])
    uploaded = [d for d in setup.cohort if not (drop_phase == "upload" and d in gone)]
    total = len(uploaded) * (per_secret + mask)
    if drop_phase == "upload":
        up = {setup.index[d] for d in uploaded}
        for d in gone:  # rebuild s_sk, check it, then one agreement and mask per uploading neighbour
            partners = sum(1 for u in setup.neighbours()[setup.index[d] - 1] if u in up)
            total += per_secret + costs["keygen"] + partners * (
                costs["x25519"] + costs["hkdf"] + mask)
    return total


def _unmask_case(n: int, length: int, *, drop_phase: str, frac: float, repeat: int,
                 costs: dict[str, float]) -> None:
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
    times, cpu = [], []
    for _ in range(repeat):
        fresh = copy.deepcopy(server)  # unmask() ends the round; time it on a copy
        # A coordinator meets new share sets every round (new graph, new dropouts):
        # no Lagrange coefficients cached from the previous repeat.
        shamir._lagrange_at_zero.cache_clear()
        t0, c0 = time.perf_counter(), time.process_time()
        total = fresh.unmask()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if total.any():
            raise SystemExit("unmasked sum of zero inputs is not zero")
    when = "before upload" if drop_phase == "upload" else "during unmask"
    bound = _unmask_bound(costs, setup, gone, drop_phase, length)
    print(f"unmask {n} devices, {length // 1000}K values, k={k} t={t}, {int(frac * 100)}% "
          f"dropped {when}: {statistics.median(times):.3f} s ({statistics.median(cpu):.3f} s CPU; "
          f"bound {bound:.3f} s)")


def bench_unmask(repeat: int) -> None:
    costs = primitive_costs()
    _unmask_case(500, 100_000, drop_phase="upload", frac=0.3, repeat=repeat, costs=costs)
    _unmask_case(500, 100_000, drop_phase="unmask", frac=0.3, repeat=repeat, costs=costs)


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
    ap.add_argument("--only", default="bound,round,mask,unmask,expansion")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="local epochs in the round benchmark")
    args = ap.parse_args()
    print(machine())
    print(f"load average: {os.getloadavg()[0]:.2f}")
    parts = args.only.split(",")
    if "bound" in parts:
        bench_bound()
    if "mask" in parts:
        bench_mask(args.repeat)
    if "expansion" in parts:
        bench_expansion()
    if "unmask" in parts:
        bench_unmask(args.repeat)
    if "round" in parts:
        bench_round(args.repeat, args.epochs)
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

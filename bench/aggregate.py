"""Streaming aggregation speed: 100 updates of 1M float32 values into ``WeightedMean``.

Each case adds 100 distinct deltas of 1,048,576 float32 values (4 MiB each,
400 MiB in all, so the deltas come from memory, not cache) with example-count
weights into :class:`fedge.strategies.WeightedMean`, then calls ``.result()``.
The 1M values are laid out as one tensor, and again as 4 tensors of 262,144.
Timed, median of ``--repeat`` runs: the add loop alone, and add + result.
Target: <= 40 ms for the 100 adds.

For reference, the naive numpy loop ``acc += w * delta`` (a full-size
temporary per add) runs on the same data, and a memory-bandwidth floor is
estimated as (bytes of deltas, each read once) / (copy bandwidth), where the
copy bandwidth is (bytes read + bytes written) / time of ``np.copyto`` on
256 MiB arrays, STREAM-copy style. The floor assumes the 4 MiB running sum
stays in cache; the add loop cannot beat it.

Timings on a shared machine are noisy: the median of the repeats is shown.

    .venv/bin/python bench/aggregate.py [--updates 100] [--values 1048576] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from _common import machine

TARGET_MS = 40.0


def copy_bandwidth_gbs(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Median ``np.copyto`` bandwidth in GB/s, counting bytes read plus bytes written."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


def make_updates(
    num_updates: int, num_values: int, num_tensors: int, rng: np.random.Generator
) -> list[dict[str, np.ndarray]]:
    """``num_updates`` deltas, each ``num_values`` float32 values cut into ``num_tensors`` tensors."""
    if num_values % num_tensors:
        raise SystemExit(f"--values {num_values} does not split into {num_tensors} equal tensors")
    part = num_values // num_tensors
    out = []
    for _ in range(num_updates):
        flat = rng.standard_normal(num_values, dtype=np.float32)
        out.append({f"t{i}": flat[i * part : (i + 1) * part] for i in range(num_tensors)})
    return out


def _median_ms(fn: Callable[[], tuple[float, float]], repeat: int) -> tuple[float, float]:
    """Run ``fn`` (returning two durations in s) ``repeat`` times after a warm-up; medians in ms."""
    fn()
    runs = [fn() for _ in range(repeat)]
    return (1e3 * statistics.median(r[0] for r in runs), 1e3 * statistics.median(r[1] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--values", type=int, default=1 << 20, help="values per update (default 1048576)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from fedge.strategies import WeightedMean

    print(f"machine: {machine()}")
    bw = copy_bandwidth_gbs()
    read_bytes = a.updates * a.values * 4
    floor_ms = 1e3 * read_bytes / (bw * 1e9)
    print(f"np.copyto bandwidth: {bw:.1f} GB/s (read + write); "
          f"floor for reading {read_bytes / 2**20:.0f} MiB of deltas once: {floor_ms:.1f} ms\n")

    rng = np.random.default_rng(a.seed)
    weights = [float(w) for w in rng.integers(10, 1000, size=a.updates)]
    print(f"| layout | method | add loop ms (median of {a.repeat}) | add + result ms | GB/s of deltas "
          f"| x floor | <= {TARGET_MS:.0f} ms |")
    print("|---|---|---|---|---|---|---|")
    for num_tensors in (1, 4):
        updates = make_updates(a.updates, a.values, num_tensors, rng)
        template = updates[0]

        def streamed(updates: list[dict[str, np.ndarray]] = updates,
                     template: dict[str, np.ndarray] = template) -> tuple[float, float]:
            acc = WeightedMean(template)
            t0 = time.perf_counter()
            for delta, w in zip(updates, weights, strict=True):
                acc.add(delta, w)
            t1 = time.perf_counter()
            acc.result()
            t2 = time.perf_counter()
            return t1 - t0, t2 - t0

        def naive(updates: list[dict[str, np.ndarray]] = updates,
                  template: dict[str, np.ndarray] = template) -> tuple[float, float]:
            acc = {k: np.zeros_like(v) for k, v in template.items()}
            t0 = time.perf_counter()
            total = 0.0
            for delta, w in zip(updates, weights, strict=True):
                for k in acc:
                    acc[k] += np.float32(w) * delta[k]
                total += w
            t1 = time.perf_counter()
            _mean = {k: v * np.float32(1.0 / total) for k, v in acc.items()}
            t2 = time.perf_counter()
            return t1 - t0, t2 - t0

        # The two must agree before their speeds mean anything.
        acc = WeightedMean(template)
        for delta, w in zip(updates, weights, strict=True):
            acc.add(delta, w)
        got = acc.result().delta
        total_w = sum(weights)
        for k in template:
            want = sum(np.float64(w) * d[k].astype(np.float64) for d, w in zip(updates, weights,
                                                                                 strict=True))
            np.testing.assert_allclose(got[k], want / total_w, rtol=1e-4, atol=1e-5)

        layout = "1 tensor" if num_tensors == 1 else f"{num_tensors} tensors"
        for name, fn in (("WeightedMean", streamed), ("naive acc += w * d", naive)):
            add_ms, all_ms = _median_ms(fn, a.repeat)
            gbs = read_bytes / (add_ms / 1e3) / 1e9
            ok = ("yes" if add_ms <= TARGET_MS else "NO") if name == "WeightedMean" else "-"
            print(f"| {layout} | {name} | {add_ms:.1f} | {all_ms:.1f} | {gbs:.1f} "
                  f"| {add_ms / floor_ms:.2f} | {ok} |", flush=True)
        del updates


if __name__ == "__main__":
    main()

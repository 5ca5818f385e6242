"""Shamir t-of-n secret sharing (Shamir, CACM 1979) over GF(p), p = 2^521 - 1.

A secret is a 32-byte string read as an integer below 2^256 < p, so every
secret fits one field element. A share is ``(x, y)`` with ``x`` in 1..p-1 (the
device's index in the cohort, never 0: f(0) is the secret). Any ``t`` shares
recover the secret; fewer reveal nothing about it (every value is equally
likely). Lagrange coefficients at 0 depend only on the set of x's used, and the
coordinator reconstructs many secrets from the same sets, so they are cached.

Cost, in Python integers (each device splits two secrets a round, the
coordinator rebuilds one per device):

- p is a Mersenne prime, so ``v mod p`` is a fold, ``(v & p) + (v >> 521)``,
  three times cheaper than Python's long division (:func:`_mod_p`);
- the share points are small integers (cohort indices), so a Lagrange
  denominator ``prod_{j != i} (x_j - x_i)`` is exact: differences are
  multiplied a few at a time in int64 (as many as fit 62 bits), the partial
  products once as Python integers, and all ``t`` denominators are inverted
  with a single modular inverse (Montgomery's batch inversion);
- :func:`split` draws the randomness of all its coefficients in one call.

The tests check every fast path against the textbook formulas, value for value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from fedge.secagg.primitives import SecAggError

__all__ = ["PRIME", "SHARE_BYTES", "decode_share", "encode_share", "reconstruct", "split"]

PRIME = (1 << 521) - 1
_BITS = 521
SHARE_BYTES = 66  # ceil(521 / 8)
_SECRET_BYTES = 32
_COEFF_BYTES = 80


def _mod_p(v: int) -> int:
    """``v mod p`` for ``v >= 0``: fold the bits above 521 onto the low ones (2^521 = 1 mod p)."""
    while v > PRIME:
        v = (v & PRIME) + (v >> _BITS)
    return 0 if v == PRIME else v


def split(
    secret: bytes, *, xs: Sequence[int], threshold: int, random_bytes: Callable[[int], bytes]
) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for every x in ``xs``; any ``threshold`` recover it.

    Raises:
        SecAggError: the secret is not 32 bytes, ``threshold`` is outside
            1..len(xs), an x is repeated or outside 1..p-1, or ``random_bytes``
            returned the wrong number of bytes.
    """
    if not isinstance(secret, bytes) or len(secret) != _SECRET_BYTES:
        raise SecAggError("malformed", f"a secret must be {_SECRET_BYTES} bytes")
    xs = list(xs)
    if len(set(xs)) != len(xs) or any(
        isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME for x in xs
    ):
        raise SecAggError("malformed", "share points must be distinct integers in 1..p-1")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(xs):
        raise SecAggError("malformed", f"threshold must be in 1..{len(xs)}, got {threshold!r}")
    # 80 random bytes reduced mod p: the bias is below 2^-119 per coefficient.
    pool = random_bytes(_COEFF_BYTES * (threshold - 1))
    if not isinstance(pool, bytes | bytearray) or len(pool) != _COEFF_BYTES * (threshold - 1):
        raise SecAggError("malformed", "random_bytes returned the wrong number of bytes")
    # Highest degree first, for Horner's rule.
    high_first = [
        _mod_p(int.from_bytes(pool[i : i + _COEFF_BYTES], "big"))
        for i in range(0, len(pool), _COEFF_BYTES)
    ][::-1]
    high_first.append(int.from_bytes(secret, "big"))
    out: dict[int, int] = {}
    for x in xs:
        y = 0
        for c in high_first:
            y = y * x + c
            # y < p * x + p: fold once (exact for x < 2^521), then at most two subtractions.
            y = (y & PRIME) + (y >> _BITS)
            if y >= PRIME:
                y -= PRIME
                if y >= PRIME:
                    y -= PRIME
        out[x] = y
    return out


def _denominators(xs: tuple[int, ...]) -> list[int]:
    """``|prod_{j != i} (x_j - x_i)|`` for sorted distinct ``xs``, exactly.

    Differences are multiplied ``group`` at a time in int64 (``group`` of them
    fit 62 bits), so the Python-integer products are ``group`` times fewer.
    """
    t = len(xs)
    span_bits = max(1, (xs[-1] - xs[0]).bit_length())
    group = 62 // span_bits if span_bits <= 31 else 0
    if group < 2:  # huge share points: plain Python integers
        return [math.prod(abs(xj - xi) for xj in xs if xj != xi) for xi in xs]
    arr = np.array(xs, dtype=np.int64)
    diff = np.abs(arr[None, :] - arr[:, None])
    np.fill_diagonal(diff, 1)
    cols = -(-t // group) * group
    if cols > t:
        diff = np.concatenate([diff, np.ones((t, cols - t), dtype=np.int64)], axis=1)
    packed = diff.reshape(t, cols // group, group).prod(axis=2)
    return [math.prod(row) for row in packed.tolist()]


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """``lambda_i = prod_{j != i} x_j / (x_j - x_i)`` mod p for sorted distinct ``xs``."""
    t = len(xs)
    everything = math.prod(xs)
    # With xs sorted, x_j - x_i < 0 for exactly the i values j < i: sign (-1)^i.
    dens = [_mod_p(d) for d in _denominators(xs)]
    for i in range(1, t, 2):
        dens[i] = PRIME - dens[i]
    # Montgomery's batch inversion: prefix products, one inverse, walk back.
    prefix = [1] * (t + 1)
    for i, d in enumerate(dens):
        prefix[i + 1] = _mod_p(prefix[i] * d)
    inverse = pow(prefix[t], -1, PRIME)  # of the product of every denominator
    out = [0] * t
    for i in range(t - 1, -1, -1):
        out[i] = _mod_p(_mod_p(inverse * prefix[i]) * _mod_p(everything // xs[i]))
        inverse = _mod_p(inverse * dens[i])
    return tuple(out)


def reconstruct(shares: dict[int, int], *, threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the ``threshold`` smallest x's are used).

    Raises:
        SecAggError: fewer than ``threshold`` shares, a share point that is
            not an integer in 1..p-1 or a value that is no field element, or
            the result is not a 32-byte secret (the shares were not of one
            polynomial of that degree).
    """
    if len(shares) < threshold:
        raise SecAggError(
            "below_threshold", f"{len(shares)} shares cannot recover a {threshold}-of-n secret"
        )
    if any(isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME for x in shares):
        raise SecAggError("malformed", "share points must be integers in 1..p-1")
    if any(isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < PRIME
           for y in shares.values()):
        raise SecAggError("malformed", "share values must be field elements (0..p-1)")
    xs = tuple(sorted(shares)[:threshold])
    lam = _lagrange_at_zero(xs)
    s = _mod_p(sum(shares[x] * c for x, c in zip(xs, lam, strict=True)))
    if s >= 1 << (8 * _SECRET_BYTES):
        raise SecAggError("bad_share", "shares do not reconstruct a valid secret")
    return s.to_bytes(_SECRET_BYTES, "big")


def encode_share(y: int) -> bytes:
    """A field element as :data:`SHARE_BYTES` big-endian bytes."""
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(raw: bytes) -> int:
    """Inverse of :func:`encode_share`; refuses a wrong length or a value >= p."""
    if not isinstance(raw, bytes) or len(raw) != SHARE_BYTES:
        raise SecAggError("malformed", f"a share must be {SHARE_BYTES} bytes")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise SecAggError("malformed", "a share is not a field element")
    return y

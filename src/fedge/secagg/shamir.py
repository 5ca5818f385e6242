"""Shamir t-of-n secret sharing (Shamir, CACM 1979) over GF(p), p = 2^521 - 1.

A secret is a 32-byte string read as an integer below 2^256 < p, so every
secret fits one field element. A share is ``(x, y)`` with ``x`` in 1..p-1 (the
device's index in the cohort, never 0: f(0) is the secret). Any ``t`` shares
recover the secret; fewer reveal nothing about it (every value is equally
likely). Lagrange coefficients at 0 depend only on the set of x's used, and the
coordinator reconstructs many secrets from the same sets, so they are cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from fedge.secagg.primitives import SecAggError

__all__ = ["PRIME", "SHARE_BYTES", "decode_share", "encode_share", "reconstruct", "split"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
_SECRET_BYTES = 32


def split(
    secret: bytes, *, xs: Sequence[int], threshold: int, random_bytes: Callable[[int], bytes]
) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for every x in ``xs``; any ``threshold`` recover it.

    Raises:
        SecAggError: the secret is not 32 bytes, ``threshold`` is outside
            1..len(xs), or an x is repeated or outside 1..p-1.
    """
    if not isinstance(secret, bytes) or len(secret) != _SECRET_BYTES:
        raise SecAggError("malformed", f"a secret must be {_SECRET_BYTES} bytes")
    xs = list(xs)
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("malformed", "share points must be distinct and in 1..p-1")
    if isinstance(threshold, bool) or not 1 <= threshold <= len(xs):
        raise SecAggError("malformed", f"threshold must be in 1..{len(xs)}, got {threshold!r}")
    # 80 random bytes reduced mod p: the bias is below 2^-119 per coefficient.
    coeffs = [int.from_bytes(secret, "big")] + [
        int.from_bytes(random_bytes(80), "big") % PRIME for _ in range(threshold - 1)
    ]
    out: dict[int, int] = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: dict[int, int], *, threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the ``threshold`` smallest x's are used).

    Raises:
        SecAggError: fewer than ``threshold`` shares, or the result is not a
            32-byte secret (the shares were not of one polynomial of that degree).
    """
    if len(shares) < threshold:
        raise SecAggError(
            "below_threshold", f"{len(shares)} shares cannot recover a {threshold}-of-n secret"
        )
    xs = tuple(sorted(shares)[:threshold])
    lam = _lagrange_at_zero(xs)
    s = sum(shares[x] * c for x, c in zip(xs, lam, strict=True)) % PRIME
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

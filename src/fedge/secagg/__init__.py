"""Secure aggregation: SecAgg+ (Bell et al., CCS 2020) on Bonawitz et al. (CCS 2017).

- :mod:`fedge.secagg.primitives`: X25519, HKDF-SHA256, AES-GCM shares, the AES-CTR mask PRG.
- :mod:`fedge.secagg.shamir`: t-of-n Shamir sharing over GF(2^521 - 1).
- :mod:`fedge.secagg.protocol`: the four rounds as pure client and server state machines.

Everything here is pure: no sockets, disk or wall clock; randomness is an argument.
"""

from __future__ import annotations

from fedge.secagg.primitives import SecAggError

__all__ = ["SecAggError"]

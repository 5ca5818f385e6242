"""Cryptographic primitives of secure aggregation, all on ``cryptography``.

- X25519 key agreement (RFC 7748): two devices agree on a secret through the
  coordinator, which sees only public keys.
- HKDF-SHA256 (RFC 5869): every key derived from an agreed secret has its own
  ``info`` label (:data:`INFO_MASK_SEED`, :data:`INFO_SHARE_KEY`), so the pairwise
  mask seed and the share-encryption key of the same pair are independent.
- AES-256-GCM: the Shamir shares a device sends another through the
  coordinator are encrypted and authenticated, bound to (round, sender, receiver).
- The mask PRG: AES-256-CTR keystream under a 32-byte seed, written straight
  into a preallocated uint32 buffer with ``update_into`` (no temporary copies);
  a 256-bit seed, never a 32-bit seed fed to a non-cryptographic generator.
  :func:`add_masks_` adds many masks to one vector in a single pass: one
  AES-CTR context per seed, advanced chunk by chunk, so a chunk of the vector
  and its keystream stay in the CPU cache while every mask is added to it
  (the keystream bytes are the same as :func:`expand_mask`'s).

Every failure is a :class:`SecAggError` (a :class:`~fedge.errors.ProtocolError`);
an authentication failure says only that, never why (no oracle for an attacker).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge.errors import ProtocolError

__all__ = [
    "INFO_MASK_SEED",
    "INFO_SHARE_KEY",
    "KEY_BYTES",
    "NONCE_BYTES",
    "SecAggError",
    "add_mask_",
    "add_masks_",
    "agree",
    "decrypt_share",
    "derive_key",
    "encrypt_share",
    "expand_mask",
    "load_private",
    "public_key",
]

KEY_BYTES = 32
NONCE_BYTES = 12
INFO_MASK_SEED = b"fedge/secagg/v1/pairwise-mask-seed"
INFO_SHARE_KEY = b"fedge/secagg/v1/share-encryption-key"
_ZERO_NONCE = bytes(16)
#: Values per chunk in :func:`add_masks_`: 64 KiB of vector and 64 KiB of keystream fit
#: in a core's L2 cache; larger chunks spill to memory, smaller ones pay call overhead.
MASK_CHUNK = 16384
#: Seeds expanded together in :func:`add_masks_` (one open AES context each).
_MASK_GROUP = 256


class SecAggError(ProtocolError):
    """A secure-aggregation check failed; ``device`` names the device at fault when known."""

    def __init__(self, reason: str, detail: str, *, device: str | None = None) -> None:
        self.device = device
        who = f"device {device!r}: " if device is not None else ""
        super().__init__(reason, who + detail, status=400)


def _check_bytes(name: str, value: object, length: int) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise SecAggError("malformed", f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != length:
        raise SecAggError("malformed", f"{name} must be {length} bytes, got {len(value)}")
    return bytes(value)


def load_private(private: bytes | X25519PrivateKey) -> X25519PrivateKey:
    """A private key object (loading costs about as much as an exchange: load once, reuse)."""
    if isinstance(private, X25519PrivateKey):
        return private
    return X25519PrivateKey.from_private_bytes(_check_bytes("private key", private, KEY_BYTES))


def public_key(private: bytes | X25519PrivateKey) -> bytes:
    """The X25519 public key (32 bytes) of a 32-byte private key."""
    sk = load_private(private)
    return sk.public_key().public_bytes_raw()


def agree(private: bytes | X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret of ``private`` and ``peer_public`` (RFC 7748).

    Raises:
        SecAggError: a key of the wrong length, or a low-order peer key (the
            all-zero shared secret RFC 7748 section 6.1 says to refuse).
    """
    sk = load_private(private)
    pk = X25519PublicKey.from_public_bytes(_check_bytes("peer public key", peer_public, KEY_BYTES))
    try:
        return sk.exchange(pk)
    except ValueError:
        raise SecAggError("bad_key", "the peer public key is of low order") from None


def derive_key(secret: bytes, *, info: bytes, salt: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret``; ``info`` names what the key is for."""
    if not info:
        raise SecAggError("malformed", "HKDF info must name the derived key")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _aad(round_id: int, sender: int, receiver: int) -> bytes:
    return struct.pack(">4sQQQ", b"fsa1", round_id, sender, receiver)


def encrypt_share(
    key: bytes, nonce: bytes, plaintext: bytes, *, round_id: int, sender: int, receiver: int
) -> bytes:
    """AES-256-GCM ciphertext ``nonce || ct || tag``, bound to (round, sender, receiver)."""
    k = _check_bytes("share key", key, KEY_BYTES)
    n = _check_bytes("nonce", nonce, NONCE_BYTES)
    return n + AESGCM(k).encrypt(n, plaintext, _aad(round_id, sender, receiver))


def decrypt_share(key: bytes, blob: bytes, *, round_id: int, sender: int, receiver: int) -> bytes:
    """Open :func:`encrypt_share`'s output.

    Raises:
        SecAggError: too short, or the authentication failed (wrong key,
            altered bytes, or another round / sender / receiver).
    """
    k = _check_bytes("share key", key, KEY_BYTES)
    if not isinstance(blob, bytes | bytearray) or len(blob) < NONCE_BYTES + 16:
        raise SecAggError("malformed", "encrypted share is too short or not bytes")
    try:
        return AESGCM(k).decrypt(
            bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), _aad(round_id, sender, receiver)
        )
    except InvalidTag:
        raise SecAggError("share_auth", "an encrypted share failed authentication") from None


def expand_mask(seed: bytes, out: np.ndarray) -> np.ndarray:
    """Fill the uint32 array ``out`` with the AES-256-CTR keystream of ``seed``.

    The keystream is written in place (``out`` is zeroed, then encrypted into
    itself), so expanding a mask costs no allocation.
    """
    s = _check_bytes("mask seed", seed, KEY_BYTES)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint32 or not out.flags.c_contiguous:
        raise SecAggError("malformed", "mask buffer must be a C-contiguous uint32 array")
    out.fill(0)
    view = out.data.cast("B")
    Cipher(algorithms.AES(s), modes.CTR(_ZERO_NONCE)).encryptor().update_into(view, view)
    return out


def add_mask_(vector: np.ndarray, seed: bytes, scratch: np.ndarray, *, sign: int) -> None:
    """``vector += sign * PRG(seed)`` mod 2^32, with ``scratch`` as the keystream buffer."""
    if sign not in (1, -1):
        raise SecAggError("malformed", f"mask sign must be +1 or -1, got {sign!r}")
    if scratch.shape != vector.shape:
        raise SecAggError("malformed", "scratch buffer and vector differ in shape")
    expand_mask(seed, scratch)
    if sign > 0:
        np.add(vector, scratch, out=vector)
    else:
        np.subtract(vector, scratch, out=vector)


def add_masks_(vector: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """``vector += sum_i sign_i * PRG(seed_i)`` mod 2^32 for ``masks = [(seed_i, sign_i), ...]``.

    The same result as :func:`add_mask_` for each mask in turn (the test
    suite checks it bit for bit), computed chunk by chunk: each seed's AES-CTR
    context runs on through the vector, writing :data:`MASK_CHUNK` values of
    keystream into a small buffer that is added to the vector's chunk at once.

    Raises:
        SecAggError: ``vector`` is not a C-contiguous 1-D uint32 array, a seed
            is not 32 bytes, or a sign is not +1 or -1.
    """
    if (not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.ndim != 1
            or not vector.flags.c_contiguous):
        raise SecAggError("malformed", "the masked vector must be a C-contiguous 1-D uint32 array")
    checked = []
    for seed, sign in masks:
        if sign not in (1, -1):
            raise SecAggError("malformed", f"mask sign must be +1 or -1, got {sign!r}")
        checked.append((_check_bytes("mask seed", seed, KEY_BYTES), sign))
    n = vector.size
    chunk = min(MASK_CHUNK, n)
    zeros = memoryview(bytes(4 * chunk))
    scratch = np.empty(chunk, dtype=np.uint32)
    scratch_bytes = scratch.data.cast("B")
    for g in range(0, len(checked), _MASK_GROUP):
        group = [
            (Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor(), sign > 0)
            for seed, sign in checked[g : g + _MASK_GROUP]
        ]
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            part, stream = vector[lo : lo + m], scratch[:m]
            plain, out = zeros[: 4 * m], scratch_bytes[: 4 * m]
            for ctx, plus in group:
                ctx.update_into(plain, out)
                if plus:
                    np.add(part, stream, out=part)
                else:
                    np.subtract(part, stream, out=part)

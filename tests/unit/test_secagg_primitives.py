"""Known answers (RFC 7748, RFC 5869) and refusals of the secure-aggregation primitives."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedge.secagg import shamir
from fedge.secagg.primitives import (
    INFO_MASK_SEED,
    INFO_SHARE_KEY,
    MASK_CHUNK,
    SecAggError,
    add_mask_,
    add_masks_,
    agree,
    decrypt_share,
    derive_key,
    encrypt_share,
    expand_mask,
    public_key,
)

H = bytes.fromhex
ALICE_SK = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_section_6_1() -> None:
    assert public_key(ALICE_SK) == ALICE_PK
    assert public_key(BOB_SK) == BOB_PK
    assert agree(ALICE_SK, BOB_PK) == SHARED
    assert agree(BOB_SK, ALICE_PK) == SHARED


def test_x25519_rfc7748_section_5_2_scalar_mult() -> None:
    scalar = H("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = H("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert agree(scalar, u) == H("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, "x" * 32, None])
def test_x25519_refuses_malformed_keys(bad: object) -> None:
    with pytest.raises(SecAggError, match="malformed"):
        agree(ALICE_SK, bad)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="malformed"):
        agree(bad, BOB_PK)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="malformed"):
        public_key(bad)  # type: ignore[arg-type]


def test_x25519_refuses_low_order_point() -> None:
    with pytest.raises(SecAggError, match="low order"):
        agree(ALICE_SK, bytes(32))


def test_hkdf_rfc5869_case_1() -> None:
    okm = derive_key(
        H("0b" * 22), salt=H("000102030405060708090a0b0c"), info=H("f0f1f2f3f4f5f6f7f8f9"), length=42
    )
    assert okm == H(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_info_separates_keys_and_refuses_empty_info() -> None:
    a = derive_key(SHARED, info=INFO_MASK_SEED, salt=b"s")
    b = derive_key(SHARED, info=INFO_SHARE_KEY, salt=b"s")
    assert a != b and len(a) == len(b) == 32
    with pytest.raises(SecAggError, match="info"):
        derive_key(SHARED, info=b"", salt=b"s")


def test_share_encryption_round_trip_and_binding() -> None:
    key = bytes(range(32))
    blob = encrypt_share(key, b"n" * 12, b"secret", round_id=3, sender=1, receiver=2)
    assert decrypt_share(key, blob, round_id=3, sender=1, receiver=2) == b"secret"
    for kwargs in ({"round_id": 4, "sender": 1, "receiver": 2},
                   {"round_id": 3, "sender": 2, "receiver": 1}):
        with pytest.raises(SecAggError, match="authentication"):
            decrypt_share(key, blob, **kwargs)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SecAggError, match="authentication"):
        decrypt_share(key, tampered, round_id=3, sender=1, receiver=2)
    with pytest.raises(SecAggError, match="authentication"):
        decrypt_share(bytes(32), blob, round_id=3, sender=1, receiver=2)
    with pytest.raises(SecAggError, match="too short"):
        decrypt_share(key, blob[:20], round_id=3, sender=1, receiver=2)
    with pytest.raises(SecAggError, match="nonce"):
        encrypt_share(key, b"short", b"x", round_id=3, sender=1, receiver=2)
    with pytest.raises(SecAggError, match="share key"):
        encrypt_share(b"k", b"n" * 12, b"x", round_id=3, sender=1, receiver=2)


def test_prg_is_the_aes_ctr_keystream_and_deterministic() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(32))
    out = expand_mask(seed, np.full(1000, 7, dtype=np.uint32))
    ks = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4000))
    assert out.tobytes() == ks
    assert np.array_equal(out, expand_mask(seed, np.empty(1000, dtype=np.uint32)))
    assert not np.array_equal(out, expand_mask(bytes(32), np.empty(1000, dtype=np.uint32)))


@pytest.mark.parametrize(
    "buf",
    [np.zeros(4, dtype=np.int32), np.zeros(4, dtype=np.uint64), np.zeros((4, 2), np.uint32)[:, 0]],
)
def test_prg_refuses_bad_buffers(buf: np.ndarray) -> None:
    with pytest.raises(SecAggError, match="uint32"):
        expand_mask(bytes(32), buf)


def test_prg_refuses_short_seed_and_add_mask_checks() -> None:
    with pytest.raises(SecAggError, match="mask seed"):
        expand_mask(b"x" * 4, np.zeros(4, dtype=np.uint32))
    v = np.zeros(4, dtype=np.uint32)
    with pytest.raises(SecAggError, match="sign"):
        add_mask_(v, bytes(32), np.zeros(4, dtype=np.uint32), sign=0)
    with pytest.raises(SecAggError, match="shape"):
        add_mask_(v, bytes(32), np.zeros(5, dtype=np.uint32), sign=1)
    add_mask_(v, bytes(32), np.zeros(4, dtype=np.uint32), sign=1)
    add_mask_(v, bytes(32), np.zeros(4, dtype=np.uint32), sign=-1)
    assert not v.any()


@pytest.mark.parametrize(("length", "count"), [
    (1, 3), (MASK_CHUNK - 1, 5), (MASK_CHUNK, 2), (3 * MASK_CHUNK + 17, 7), (1000, 300),
])
def test_add_masks_is_bit_identical_to_one_mask_at_a_time(length: int, count: int) -> None:
    rng = np.random.default_rng(length + count)
    masks = [(rng.bytes(32), int(rng.choice([1, -1]))) for _ in range(count)]  # 300: several groups
    start = rng.integers(0, 2**32, length, dtype=np.uint32)
    slow, fast = start.copy(), start.copy()
    scratch = np.empty_like(slow)
    for seed, sign in masks:
        add_mask_(slow, seed, scratch, sign=sign)
    add_masks_(fast, masks)
    assert np.array_equal(fast, slow)
    add_masks_(fast, [(seed, -sign) for seed, sign in masks])  # and they come off again
    assert np.array_equal(fast, start)


def test_add_masks_refusals() -> None:
    v = np.zeros(8, dtype=np.uint32)
    for bad in (np.zeros(8, dtype=np.int32), np.zeros((2, 4), dtype=np.uint32),
                np.zeros(16, dtype=np.uint32)[::2], [0] * 8):
        with pytest.raises(SecAggError, match="uint32"):
            add_masks_(bad, [(bytes(32), 1)])  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="mask seed"):
        add_masks_(v, [(bytes(31), 1)])
    with pytest.raises(SecAggError, match="sign"):
        add_masks_(v, [(bytes(32), 2)])
    add_masks_(v, [])
    assert not v.any()


def _rand(seed: int) -> Callable[[int], bytes]:
    return np.random.default_rng(seed).bytes


def test_shamir_any_t_shares_recover_and_lagrange_cache() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, xs=[1, 2, 5, 9, 11], threshold=3, random_bytes=_rand(0))
    for subset in ([1, 2, 5], [2, 9, 11], [1, 5, 9, 11]):
        assert shamir.reconstruct({x: shares[x] for x in subset}, threshold=3) == secret
    before = shamir._lagrange_at_zero.cache_info().hits
    shamir.reconstruct({x: shares[x] for x in [1, 2, 5]}, threshold=3)
    assert shamir._lagrange_at_zero.cache_info().hits == before + 1
    assert shamir.decode_share(shamir.encode_share(shares[1])) == shares[1]


def test_shamir_refusals() -> None:
    secret = bytes(32)
    with pytest.raises(SecAggError, match="32 bytes"):
        shamir.split(b"short", xs=[1, 2], threshold=2, random_bytes=_rand(0))
    with pytest.raises(SecAggError, match="distinct"):
        shamir.split(secret, xs=[1, 1], threshold=2, random_bytes=_rand(0))
    with pytest.raises(SecAggError, match="distinct"):
        shamir.split(secret, xs=[0, 1], threshold=2, random_bytes=_rand(0))
    with pytest.raises(SecAggError, match="threshold"):
        shamir.split(secret, xs=[1, 2], threshold=3, random_bytes=_rand(0))
    shares = shamir.split(secret, xs=[1, 2, 3], threshold=3, random_bytes=_rand(0))
    with pytest.raises(SecAggError, match="below_threshold"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, threshold=3)
    with pytest.raises(SecAggError, match="share"):
        shamir.decode_share(b"\x00" * 10)
    with pytest.raises(SecAggError, match="field element"):
        shamir.decode_share(b"\xff" * shamir.SHARE_BYTES)
    # Shares of another polynomial (altered) rebuild garbage, refused when it is no secret.
    bad = dict(shares)
    bad[3] = (bad[3] + 2**400) % shamir.PRIME
    with pytest.raises(SecAggError, match="bad_share"):
        shamir.reconstruct(bad, threshold=3)


def _textbook_lagrange(xs: tuple[int, ...]) -> tuple[int, ...]:
    p = shamir.PRIME
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % p
                den = den * (xj - xi) % p
        out.append(num * pow(den, -1, p) % p)
    return tuple(out)


def test_fast_field_arithmetic_matches_the_textbook_formulas() -> None:
    p, rng = shamir.PRIME, np.random.default_rng(7)
    for v in (0, 1, p - 1, p, p + 1, 2 * p, 2**521, p * p, 2**1100 + 12345,
              *(int.from_bytes(rng.bytes(140), "big") for _ in range(200))):
        assert shamir._mod_p(v) == v % p
    # Lagrange coefficients: small points (the int64 path), one point, huge points (Python ints).
    sets = [tuple(sorted(rng.choice(np.arange(1, 600), t, replace=False).tolist()))
            for t in (1, 2, 3, 18, 103)]
    sets.append((1, 2**40, 2**41 + 3, p - 1))
    sets.append(tuple(range(1, 40)))
    for xs in sets:
        assert shamir._lagrange_at_zero.__wrapped__(xs) == _textbook_lagrange(xs)


def test_split_evaluates_the_polynomial_of_its_random_bytes() -> None:
    """Horner with Mersenne folding gives f(x) mod p exactly, for small and huge points."""
    p, secret = shamir.PRIME, bytes(range(32))
    for xs, t in (([1, 2, 3, 500], 3), ([5, 2**300, p - 1], 2), (list(range(1, 35)), 18)):
        pool = np.random.default_rng(t).bytes(80 * (t - 1))
        shares = shamir.split(secret, xs=xs, threshold=t, random_bytes=lambda n, b=pool: b[:n])
        coeffs = [int.from_bytes(secret, "big")] + [
            int.from_bytes(pool[i : i + 80], "big") % p for i in range(0, len(pool), 80)
        ]
        for x in xs:
            assert shares[x] == sum(c * pow(x, e, p) for e, c in enumerate(coeffs)) % p
        assert shamir.reconstruct(dict(list(shares.items())[:t]), threshold=t) == secret


def test_shamir_refuses_bad_points_values_and_randomness() -> None:
    secret = bytes(32)
    shares = shamir.split(secret, xs=[1, 2, 3], threshold=2, random_bytes=_rand(0))
    for bad in ({0: 1, 1: shares[1]}, {True: 1, 2: shares[2]}, {shamir.PRIME: 1, 1: shares[1]}):
        with pytest.raises(SecAggError, match="share points"):
            shamir.reconstruct(bad, threshold=2)
    for value in (-1, shamir.PRIME):
        with pytest.raises(SecAggError, match="field elements"):
            shamir.reconstruct({1: shares[1], 2: value}, threshold=2)
    with pytest.raises(SecAggError, match="random_bytes"):
        shamir.split(secret, xs=[1, 2, 3], threshold=3, random_bytes=lambda n: bytes(n - 1))
    with pytest.raises(SecAggError, match="share points"):
        shamir.split(secret, xs=[1, 2.0], threshold=2, random_bytes=_rand(0))  # type: ignore[list-item]
    with pytest.raises(SecAggError, match="threshold"):
        shamir.split(secret, xs=[1, 2], threshold=1.5, random_bytes=_rand(0))  # type: ignore[arg-type]

"""SecAgg+ (Bell et al., CCS 2020) as pure client and server state machines.

The four rounds are those of Bonawitz et al. (CCS 2017); SecAgg+ replaces the
complete graph of that protocol by a random k-regular neighbour graph, so a
device agrees keys with, shares secrets with and masks against only its ``k``
neighbours: O(k) work per device instead of O(n).

0. **advertise keys**: device u sends two X25519 public keys, ``c_pk`` (share
   encryption) and ``s_pk`` (pairwise masks).
1. **share keys**: u splits its self-mask seed ``b_u`` and its mask private key
   ``s_sk`` into ``threshold``-of-``k`` Shamir shares, one pair per neighbour,
   each encrypted with AES-GCM under HKDF(X25519(c_sk_u, c_pk_v), INFO_SHARE_KEY)
   and routed through the coordinator.
2. **masked input**: u uploads ``y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv)``
   mod 2^32 over its neighbours v that shared keys, with
   ``s_uv = HKDF(X25519(s_sk_u, s_pk_v), INFO_MASK_SEED)`` and sign +1 if u < v
   else -1, so the pairwise masks of two uploaders cancel in the sum.
3. **unmask**: the coordinator names the uploaders (survivors) and the devices
   that shared keys but did not upload (dropped). Each responding device sends,
   for each neighbour, the share of ``b_v`` if v survived or of ``s_sk_v`` if v
   dropped, *never both for one device*: the client refuses a request that lists
   a device as both, so a device's own masked input can never be unmasked
   alone. The coordinator rebuilds the self-masks of the survivors and the
   pairwise masks between survivors and dropped devices, and subtracts them.

Threat model: a semi-honest (honest-but-curious) coordinator that follows the
protocol; messages are authenticated by the transport (device identity from the
TLS client certificate), and share ciphertexts end to end by AES-GCM. Any
malformed, out-of-phase, duplicate or unauthenticated message raises a
:class:`~fedge.secagg.primitives.SecAggError` naming the device. If at any
round fewer than ``threshold`` devices remain, or a secret cannot be rebuilt
from ``threshold`` shares, the round aborts and the coordinator learns nothing.

Randomness (``random_bytes``) and the graph seed are arguments; nothing here
does I/O.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property, lru_cache

import numpy as np

from fedge.errors import ConfigError
from fedge.secagg import shamir
from fedge.secagg.primitives import (
    INFO_MASK_SEED,
    INFO_SHARE_KEY,
    KEY_BYTES,
    NONCE_BYTES,
    SecAggError,
    add_masks_,
    agree,
    decrypt_share,
    derive_key,
    encrypt_share,
    load_private,
    public_key,
)

__all__ = [
    "AdvertiseKeys",
    "MaskedInput",
    "MaskingMaterial",
    "RoundSetup",
    "SecAggClient",
    "SecAggServer",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskShares",
    "apply_masks",
    "default_parameters",
    "neighbour_graph",
]

RandomBytes = Callable[[int], bytes]


# ---------------------------------------------------------------- parameters


def _binom_cdf_below(k: int, p: float, t: int) -> float:
    """P[Binomial(k, p) < t]."""
    return sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(min(t, k + 1)))


def default_parameters(
    n: int,
    *,
    dropout_rate: float = 0.1,
    corrupt_rate: float = 0.0,
    sigma: int = 40,
    eta: int = 20,
) -> tuple[int, int]:
    """``(k, threshold)`` for a cohort of ``n`` from the conditions of Bell et al. (CCS 2020).

    The neighbour graph is a Harary graph H(n, k) on a random ordering of the
    cohort (each device linked to the k/2 nearest on either side of a ring).
    Three conditions, with union bounds over the n devices:

    - *privacy (connectivity)*: the devices that remain honest and present
      must stay connected, else the coordinator learns partial sums. H(n, k)
      on a random ring splits only if k/2 consecutive devices all drop or are
      corrupt: ``n * (dropout_rate + corrupt_rate) ** (k/2) <= 2^-sigma``.
    - *privacy (threshold)*: ``threshold > k/2``, so two disjoint sets of
      responders can never hold the threshold for both secrets of one device,
      and corrupt neighbours exceed it with probability at most 2^-sigma.
    - *correctness*: every device keeps at least ``threshold`` responding
      neighbours: ``n * P[Bin(k, 1 - dropout_rate) < threshold] <= 2^-eta``.

    The smallest even ``k`` meeting all three is returned, with
    ``threshold = k // 2 + 1``; for a small cohort where no ``k < n - 1``
    does, the complete graph (``k = n - 1``) is used, as in Bonawitz et al.

    Raises:
        ConfigError: ``n < 3`` (secure aggregation of one or two devices reveals
            their inputs to each other) or rates outside [0, 1).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ConfigError(f"secure aggregation needs a cohort of at least 3 devices, got {n!r}")
    for name, rate in (("dropout_rate", dropout_rate), ("corrupt_rate", corrupt_rate)):
        if not (math.isfinite(rate) and 0 <= rate < 1):
            raise ConfigError(f"{name} must be in [0, 1), got {rate!r}")
    bad = dropout_rate + corrupt_rate
    if bad >= 1:
        raise ConfigError("dropout_rate + corrupt_rate must be below 1")
    for k in range(2, n - 1, 2):
        t = k // 2 + 1
        connected = bad == 0 or n * bad ** (k // 2) <= 2.0**-sigma
        correct = n * _binom_cdf_below(k, 1 - dropout_rate, t) <= 2.0**-eta
        corrupt_ok = corrupt_rate == 0 or n * (1 - _binom_cdf_below(k, corrupt_rate, t)) <= 2.0**-sigma
        if connected and correct and corrupt_ok:
            return k, t
    k = n - 1
    return k, k // 2 + 1


@lru_cache(maxsize=64)
def neighbour_graph(n: int, k: int, graph_seed: bytes) -> tuple[tuple[int, ...], ...]:
    """Neighbours (1-based indices) of each of ``n`` devices in H(n, k) on a seeded ring.

    ``result[i - 1]`` lists device i's neighbours in increasing order. ``k``
    even and below ``n - 1`` gives a k-regular graph; ``k >= n - 1`` the complete graph.
    """
    if k >= n - 1:
        return tuple(tuple(j for j in range(1, n + 1) if j != i) for i in range(1, n + 1))
    if k < 2 or k % 2:
        raise ConfigError(f"secagg k must be an even number >= 2 (or n - 1), got {k}")
    ring = np.random.default_rng(np.frombuffer(graph_seed, dtype=np.uint32)).permutation(n) + 1
    where = np.empty(n + 1, dtype=np.int64)
    where[ring] = np.arange(n)
    out = []
    for i in range(1, n + 1):
        pos = int(where[i])
        nbrs = {int(ring[(pos + d) % n]) for d in range(-(k // 2), k // 2 + 1) if d}
        out.append(tuple(sorted(nbrs)))
    return tuple(out)


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class RoundSetup:
    """What every cohort member and the coordinator agree on before round 0."""

    round_id: int
    cohort: tuple[str, ...]
    k: int
    threshold: int
    graph_seed: bytes
    vector_length: int
    min_survivors: int = 0

    def __post_init__(self) -> None:
        n = len(self.cohort)
        if n < 3 or len(set(self.cohort)) != n:
            raise ConfigError("secure aggregation needs at least 3 distinct devices")
        if not (2 <= self.k <= n - 1):
            raise ConfigError(f"secagg k must be in 2..{n - 1} for {n} devices, got {self.k}")
        if self.k < n - 1 and self.k % 2:
            raise ConfigError(f"secagg k must be even (or n - 1 = {n - 1}), got {self.k}")
        degree = min(self.k, n - 1)
        if not (degree // 2 < self.threshold <= degree):
            raise ConfigError(
                f"secagg threshold must be in {degree // 2 + 1}..{degree} for k={self.k} "
                f"(more than half the neighbours), got {self.threshold}"
            )
        if self.vector_length < 1:
            raise ConfigError(f"vector_length must be >= 1, got {self.vector_length}")
        if len(self.graph_seed) != KEY_BYTES:
            raise ConfigError("graph_seed must be 32 bytes")
        if isinstance(self.min_survivors, bool) or not isinstance(self.min_survivors, int) or not (
            0 <= self.min_survivors <= n
        ):
            raise ConfigError(f"min_survivors must be in 0..{n}, got {self.min_survivors!r}")

    def neighbours(self) -> tuple[tuple[int, ...], ...]:
        return neighbour_graph(len(self.cohort), self.k, self.graph_seed)

    @cached_property
    def index(self) -> Mapping[str, int]:
        """Each device's Shamir point: its 1-based position in the cohort."""
        return {name: i + 1 for i, name in enumerate(self.cohort)}

    @cached_property
    def neighbour_sets(self) -> tuple[frozenset[int], ...]:
        """``neighbours()`` as sets, for membership checks."""
        return tuple(frozenset(v) for v in self.neighbours())

    @property
    def required_survivors(self) -> int:
        """The fewest uploaders whose sum may be unmasked: ``max(threshold, min_survivors)``.

        ``min_survivors`` above the threshold is what distributed DP needs:
        each device's noise share assumes at least that many shares in the sum.
        """
        return max(self.threshold, self.min_survivors)

    def salt(self) -> bytes:
        return struct.pack(">8sQ", b"fedgesa1", self.round_id) + self.graph_seed


@dataclass(frozen=True)
class AdvertiseKeys:
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Encrypted shares, by receiving device name."""

    ciphertexts: Mapping[str, bytes]


@dataclass(frozen=True)
class MaskedInput:
    vector: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskShares:
    """Share bytes by device name: of ``b_v`` for survivors, of ``s_sk_v`` for dropped."""

    self_shares: Mapping[str, bytes]
    key_shares: Mapping[str, bytes]


@dataclass(frozen=True)
class MaskingMaterial:
    """Everything needed to mask one input (picklable bytes, for simulator workers)."""

    self_seed: bytes
    pairwise: tuple[tuple[bytes, int], ...]  # (seed, sign)
    vector_length: int


def apply_masks(material: MaskingMaterial, vector: np.ndarray) -> np.ndarray:
    """Mask ``vector`` (uint32, modified in place and returned) with ``material``."""
    if (
        not isinstance(vector, np.ndarray)
        or vector.dtype != np.uint32
        or vector.shape != (material.vector_length,)
    ):
        raise SecAggError(
            "wrong_length",
            f"the input must be a uint32 vector of length {material.vector_length}",
        )
    add_masks_(vector, ((material.self_seed, 1), *material.pairwise))
    return vector


def _share_plaintext(sender: int, receiver: int, b_share: int, sk_share: int) -> bytes:
    return struct.pack(">QQ", sender, receiver) + shamir.encode_share(b_share) + shamir.encode_share(
        sk_share
    )


# ---------------------------------------------------------------- client


class Phase(Enum):
    ADVERTISE = "advertise_keys"
    SHARE = "share_keys"
    MASK = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


class SecAggClient:
    """One device's side of a round: each method consumes the coordinator's message."""

    def __init__(self, setup: RoundSetup, device: str, *, random_bytes: RandomBytes) -> None:
        if device not in setup.cohort:
            raise SecAggError("not_invited", "not in the cohort", device=device)
        self.setup = setup
        self.device = device
        self.index = setup.index[device]
        self._rand = random_bytes
        self._nbrs = setup.neighbours()[self.index - 1]
        self._c_sk = load_private(random_bytes(KEY_BYTES))
        self._s_sk_bytes = random_bytes(KEY_BYTES)
        self._s_sk = load_private(self._s_sk_bytes)
        self._b = random_bytes(KEY_BYTES)
        self._mine = AdvertiseKeys(c_pk=public_key(self._c_sk), s_pk=public_key(self._s_sk))
        self._phase = Phase.ADVERTISE
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (b share, sk share)
        self._material: MaskingMaterial | None = None
        self._share_keys: dict[int, bytes] = {}

    def _expect(self, phase: Phase) -> None:
        if self._phase is not phase:
            raise SecAggError(
                "out_of_phase",
                f"got a {phase.value} step while in {self._phase.value}",
                device=self.device,
            )

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: the two public keys."""
        self._expect(Phase.ADVERTISE)
        self._phase = Phase.SHARE
        return self._mine

    def share_keys(self, directory: Mapping[str, AdvertiseKeys]) -> ShareKeys:
        """Round 1: encrypted shares of ``b`` and ``s_sk`` for each neighbour that advertised.

        Raises:
            SecAggError: fewer than ``threshold`` neighbours advertised (abort),
                a name outside the cohort, or the directory alters this device's keys.
        """
        self._expect(Phase.SHARE)
        cohort = self.setup.cohort
        mine = directory.get(self.device)
        if mine is None or mine != self._mine:
            raise SecAggError("bad_directory", "the key directory alters this device's keys",
                              device=self.device)
        index = self.setup.index
        for name, keys in directory.items():
            if name not in index:
                raise SecAggError("not_invited", "in the key directory, not in the cohort",
                                  device=name)
            if not isinstance(keys, AdvertiseKeys):
                raise SecAggError("malformed", "key directory entry", device=name)
        present = [v for v in self._nbrs if cohort[v - 1] in directory]
        if len(present) < self.setup.threshold:
            raise SecAggError("below_threshold",
                              f"{len(present)} neighbours advertised keys, "
                              f"threshold is {self.setup.threshold}", device=self.device)
        c_pks = {v: directory[cohort[v - 1]].c_pk for v in present}
        if len(set(c_pks.values())) != len(c_pks) or any(
            directory[cohort[v - 1]].s_pk == directory[cohort[v - 1]].c_pk for v in present
        ):
            raise SecAggError("bad_directory", "repeated public keys", device=self.device)
        self._keys = {v: (directory[cohort[v - 1]].c_pk, directory[cohort[v - 1]].s_pk)
                      for v in present}
        t = self.setup.threshold
        b_sh = shamir.split(self._b, xs=present, threshold=t, random_bytes=self._rand)
        sk_sh = shamir.split(self._s_sk_bytes, xs=present, threshold=t, random_bytes=self._rand)
        out: dict[str, bytes] = {}
        for v in present:
            key = self._share_key(v)
            out[cohort[v - 1]] = encrypt_share(
                key, self._rand(NONCE_BYTES), _share_plaintext(self.index, v, b_sh[v], sk_sh[v]),
                round_id=self.setup.round_id, sender=self.index, receiver=v,
            )
        self._phase = Phase.MASK
        return ShareKeys(out)

    def _share_key(self, v: int) -> bytes:
        key = self._share_keys.get(v)
        if key is None:  # one X25519 per neighbour, kept for decrypting its shares
            key = derive_key(agree(self._c_sk, self._keys[v][0]), info=INFO_SHARE_KEY,
                             salt=self.setup.salt())
            self._share_keys[v] = key
        return key

    def receive_shares(self, ciphertexts: Mapping[str, bytes]) -> MaskingMaterial:
        """Round 2 setup: decrypt the shares neighbours sent; return the masking material.

        The pairwise masks are with the neighbours whose shares arrived (the
        coordinator's U2), so every mask that does not cancel can be rebuilt.

        Raises:
            SecAggError: a share from a non-neighbour, one that fails
                authentication (naming its sender), fewer than ``threshold``.
        """
        self._expect(Phase.MASK)
        if self._material is not None:
            raise SecAggError("duplicate", "shares already received", device=self.device)
        held: dict[int, tuple[int, int]] = {}
        for name, blob in ciphertexts.items():
            u = self.setup.index.get(name, 0)
            if u not in self._keys:
                raise SecAggError("not_neighbour", "sent a share to a non-neighbour", device=name)
            try:
                plain = decrypt_share(self._share_key(u), blob, round_id=self.setup.round_id,
                                      sender=u, receiver=self.index)
            except SecAggError as e:
                raise SecAggError(e.reason, "its encrypted share failed authentication",
                                  device=name) from None
            if len(plain) != 16 + 2 * shamir.SHARE_BYTES or struct.unpack(">QQ", plain[:16]) != (
                u, self.index
            ):
                raise SecAggError("malformed", "share plaintext", device=name)
            held[u] = (shamir.decode_share(plain[16:16 + shamir.SHARE_BYTES]),
                       shamir.decode_share(plain[16 + shamir.SHARE_BYTES:]))
        if len(held) < self.setup.threshold:
            raise SecAggError("below_threshold", f"{len(held)} neighbours shared keys",
                              device=self.device)
        self._held = held
        salt = self.setup.salt()
        pairwise = tuple(
            (derive_key(agree(self._s_sk, self._keys[v][1]), info=INFO_MASK_SEED, salt=salt),
             1 if self.index < v else -1)
            for v in sorted(held)
        )
        self._material = MaskingMaterial(self._b, pairwise, self.setup.vector_length)
        return self._material

    def masked_input(self, vector: np.ndarray) -> MaskedInput:
        """Round 2: mask ``vector`` (uint32; modified in place)."""
        material = self.mark_uploaded()
        return MaskedInput(apply_masks(material, vector))

    def mark_uploaded(self) -> MaskingMaterial:
        """Move past round 2 when the masking ran elsewhere (a simulator worker)."""
        self._expect(Phase.MASK)
        if self._material is None:
            raise SecAggError("out_of_phase", "masked input before shares were received",
                              device=self.device)
        self._phase = Phase.UNMASK
        return self._material

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Round 3: shares of ``b_v`` for survivors and of ``s_sk_v`` for dropped neighbours.

        Raises:
            SecAggError: a device is named both survivor and dropped (revealing
                both secrets would unmask its input alone), a device that did
                not share keys, or fewer survivors than the threshold (or than
                ``setup.min_survivors``, below which the sum would carry less
                distributed-DP noise than each share assumed).
        """
        self._expect(Phase.UNMASK)
        cohort = self.setup.cohort
        surv, drop = set(request.survivors), set(request.dropped)
        both = surv & drop
        if both:
            raise SecAggError("both_shares", "the unmask request names a device both survivor "
                              "and dropped", device=sorted(both)[0])
        need = self.setup.required_survivors
        if len(surv) < need or self.device not in surv:
            raise SecAggError("below_threshold", f"{len(surv)} survivors, at least {need} "
                              f"needed (threshold {self.setup.threshold})", device=self.device)
        for name in surv | drop:
            if name not in self.setup.index:
                raise SecAggError("not_invited", "named in the unmask request", device=name)
        self._phase = Phase.DONE
        self_sh: dict[str, bytes] = {}
        key_sh: dict[str, bytes] = {}
        for v, (b_s, sk_s) in self._held.items():
            name = cohort[v - 1]
            if name in surv:
                self_sh[name] = shamir.encode_share(b_s)
            elif name in drop:
                key_sh[name] = shamir.encode_share(sk_s)
        return UnmaskShares(self_sh, key_sh)


# ---------------------------------------------------------------- server


@dataclass
class _ServerRound:
    keys: dict[int, AdvertiseKeys] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver -> ct
    uploaded: set[int] = field(default_factory=set)
    responses: dict[int, UnmaskShares] = field(default_factory=dict)


class SecAggServer:
    """The coordinator's side: collects each round's messages, then unmasks the sum.

    Each ``receive_*`` takes the device name the transport authenticated and
    its message; each ``close_*`` ends a round (the deadline passed or all
    answered) and returns what the next round sends. Masked inputs are summed
    as they arrive, so memory is O(model) whatever the cohort size.
    """

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self._index = setup.index
        self._nbrs = setup.neighbour_sets
        self._phase = Phase.ADVERTISE
        self._r = _ServerRound()
        self._sum = np.zeros(setup.vector_length, dtype=np.uint32)
        self._request: UnmaskRequest | None = None

    @property
    def phase(self) -> str:
        return self._phase.value

    def _who(self, device: str, phase: Phase) -> int:
        u = self._index.get(device)
        if u is None:
            raise SecAggError("not_invited", "not in this round's cohort", device=device)
        if self._phase is not phase:
            raise SecAggError("out_of_phase", f"sent {phase.value} during {self._phase.value}",
                              device=device)
        return u

    def _abort_if_few(self, count: int, what: str, need: int | None = None) -> None:
        need = self.setup.threshold if need is None else need
        if count < need:
            self._phase = Phase.DONE
            raise SecAggError("below_threshold", f"only {count} devices {what}; {need} are "
                              "needed: the round is aborted and nothing revealed")

    # round 0
    def receive_keys(self, device: str, msg: AdvertiseKeys) -> None:
        u = self._who(device, Phase.ADVERTISE)
        if u in self._r.keys:
            raise SecAggError("duplicate", "advertised keys twice", device=device)
        if (not isinstance(msg, AdvertiseKeys) or not isinstance(msg.c_pk, bytes)
                or not isinstance(msg.s_pk, bytes) or len(msg.c_pk) != KEY_BYTES
                or len(msg.s_pk) != KEY_BYTES or msg.c_pk == msg.s_pk):
            raise SecAggError("malformed", "advertised keys are malformed", device=device)
        self._r.keys[u] = msg

    def close_keys(self) -> dict[str, AdvertiseKeys]:
        """End round 0: the key directory every device that advertised receives."""
        if self._phase is not Phase.ADVERTISE:
            raise SecAggError("out_of_phase", f"close_keys during {self._phase.value}")
        self._abort_if_few(len(self._r.keys), "advertised keys")
        self._phase = Phase.SHARE
        return {self.setup.cohort[u - 1]: m for u, m in self._r.keys.items()}

    # round 1
    def receive_shares(self, device: str, msg: ShareKeys) -> None:
        u = self._who(device, Phase.SHARE)
        if u not in self._r.keys:
            raise SecAggError("out_of_phase", "shared keys without advertising", device=device)
        if u in self._r.shares:
            raise SecAggError("duplicate", "shared keys twice", device=device)
        if not isinstance(msg, ShareKeys):
            raise SecAggError("malformed", "share-keys message", device=device)
        out: dict[int, bytes] = {}
        for name, ct in msg.ciphertexts.items():
            v = self._index.get(name)
            if v is None or v not in self._nbrs[u - 1] or v not in self._r.keys:
                raise SecAggError("not_neighbour", f"sent a share to {name!r}, not a neighbour "
                                  "that advertised keys", device=device)
            if not isinstance(ct, bytes) or len(ct) != (
                NONCE_BYTES + 16 + 16 + 2 * shamir.SHARE_BYTES
            ):
                raise SecAggError("malformed", "an encrypted share has the wrong size",
                                  device=device)
            out[v] = ct
        if len(out) < self.setup.threshold:
            raise SecAggError("malformed", f"sent {len(out)} shares, fewer than the threshold",
                              device=device)
        self._r.shares[u] = out

    def close_shares(self) -> dict[str, dict[str, bytes]]:
        """End round 1: for each device that shared, the ciphertexts addressed to it."""
        if self._phase is not Phase.SHARE:
            raise SecAggError("out_of_phase", f"close_shares during {self._phase.value}")
        self._abort_if_few(len(self._r.shares), "shared keys")
        self._phase = Phase.MASK
        cohort = self.setup.cohort
        inbox: dict[str, dict[str, bytes]] = {cohort[u - 1]: {} for u in self._r.shares}
        for u, outs in self._r.shares.items():
            for v, ct in outs.items():
                if v in self._r.shares:
                    inbox[cohort[v - 1]][cohort[u - 1]] = ct
        return inbox

    # round 2
    def receive_masked(self, device: str, msg: MaskedInput) -> None:
        u = self._who(device, Phase.MASK)
        if u not in self._r.shares:
            raise SecAggError("out_of_phase", "uploaded without sharing keys", device=device)
        if u in self._r.uploaded:
            raise SecAggError("duplicate", "uploaded a masked input twice", device=device)
        vec = msg.vector if isinstance(msg, MaskedInput) else None
        if (not isinstance(vec, np.ndarray) or vec.dtype != np.uint32
                or vec.shape != (self.setup.vector_length,)):
            raise SecAggError("wrong_length", "the masked input must be a uint32 vector of "
                              f"length {self.setup.vector_length}", device=device)
        np.add(self._sum, vec, out=self._sum)
        self._r.uploaded.add(u)

    def receive_masked_sum(self, devices: Sequence[str], total: np.ndarray) -> None:
        """Add a partial sum of masked inputs (a simulator worker summed them)."""
        us = [self._who(d, Phase.MASK) for d in devices]
        for d, u in zip(devices, us, strict=True):
            if u not in self._r.shares:
                raise SecAggError("out_of_phase", "uploaded without sharing keys", device=d)
            if u in self._r.uploaded or us.count(u) > 1:
                raise SecAggError("duplicate", "uploaded a masked input twice", device=d)
        if (not isinstance(total, np.ndarray) or total.dtype != np.uint32
                or total.shape != (self.setup.vector_length,)):
            raise SecAggError("wrong_length", "a partial masked sum has the wrong shape")
        np.add(self._sum, total, out=self._sum)
        self._r.uploaded.update(us)

    def close_masked(self) -> UnmaskRequest:
        """End round 2: the unmask request (survivors = uploaders; dropped = shared, no upload)."""
        if self._phase is not Phase.MASK:
            raise SecAggError("out_of_phase", f"close_masked during {self._phase.value}")
        self._abort_if_few(len(self._r.uploaded), "uploaded masked inputs",
                           self.setup.required_survivors)
        self._phase = Phase.UNMASK
        cohort = self.setup.cohort
        dropped = set(self._r.shares) - self._r.uploaded
        self._request = UnmaskRequest(
            tuple(cohort[u - 1] for u in sorted(self._r.uploaded)),
            tuple(cohort[u - 1] for u in sorted(dropped)),
        )
        return self._request

    # round 3
    def receive_unmask(self, device: str, msg: UnmaskShares) -> None:
        u = self._who(device, Phase.UNMASK)
        if u not in self._r.uploaded:
            raise SecAggError("out_of_phase", "sent unmask shares without uploading",
                              device=device)
        if u in self._r.responses:
            raise SecAggError("duplicate", "sent unmask shares twice", device=device)
        assert self._request is not None
        surv, drop = set(self._request.survivors), set(self._request.dropped)
        if not isinstance(msg, UnmaskShares):
            raise SecAggError("malformed", "unmask message", device=device)
        for names, allowed in ((msg.self_shares, surv), (msg.key_shares, drop)):
            for name, raw in names.items():
                v = self._index.get(name)
                if name not in allowed or v is None or u not in self._nbrs[v - 1]:
                    raise SecAggError("malformed", f"sent an unrequested share of {name!r}",
                                      device=device)
                if not isinstance(raw, bytes) or len(raw) != shamir.SHARE_BYTES:
                    raise SecAggError("malformed", "a share has the wrong size", device=device)
        self._r.responses[u] = msg

    def unmask(self) -> np.ndarray:
        """End round 3: the sum of the survivors' inputs mod 2^32.

        Raises:
            SecAggError: fewer than ``threshold`` responders, a secret with
                fewer than ``threshold`` shares, or a rebuilt mask key that does
                not match its advertised public key (the round aborts; the
                masked sum is never returned).
        """
        if self._phase is not Phase.UNMASK:
            raise SecAggError("out_of_phase", f"unmask during {self._phase.value}")
        self._abort_if_few(len(self._r.responses), "answered the unmask request")
        self._phase = Phase.DONE
        assert self._request is not None
        cohort = self.setup.cohort
        t = self.setup.threshold
        salt = self.setup.salt()
        shares_b: dict[int, dict[int, int]] = {}
        shares_sk: dict[int, dict[int, int]] = {}
        for w, msg in self._r.responses.items():
            for name, raw in msg.self_shares.items():
                shares_b.setdefault(self._index[name], {})[w] = shamir.decode_share(raw)
            for name, raw in msg.key_shares.items():
                shares_sk.setdefault(self._index[name], {})[w] = shamir.decode_share(raw)
        # Every secret is rebuilt (and checked) before the sum is touched; then
        # all the masks to take away go in one pass over the vector.
        masks: list[tuple[bytes, int]] = []
        for u in sorted(self._r.uploaded):
            try:
                b = shamir.reconstruct(shares_b.get(u, {}), threshold=t)
            except SecAggError as e:
                raise SecAggError(e.reason, "its self-mask cannot be rebuilt; round aborted",
                                  device=cohort[u - 1]) from None
            masks.append((b, -1))
        ordered = self.setup.neighbours()
        for v in (self._index[n] for n in self._request.dropped):
            partners = [u for u in ordered[v - 1]
                        if u in self._r.uploaded and u in self._r.shares[v]]
            if not partners:
                continue  # nobody masked against v: nothing to rebuild
            try:
                sk = shamir.reconstruct(shares_sk.get(v, {}), threshold=t)
            except SecAggError as e:
                raise SecAggError(e.reason, "its mask key cannot be rebuilt; round aborted",
                                  device=cohort[v - 1]) from None
            if public_key(sk) != self._r.keys[v].s_pk:
                raise SecAggError("bad_share", "rebuilt mask key does not match its public key; "
                                  "round aborted", device=cohort[v - 1])
            sk_key = load_private(sk)
            for u in partners:
                seed = derive_key(agree(sk_key, self._r.keys[u].s_pk), info=INFO_MASK_SEED, salt=salt)
                # u added sign(u, v) * PRG(s_uv); take it away.
                masks.append((seed, -1 if u < v else 1))
        total = self._sum  # the round is over: the masked sum becomes the result
        add_masks_(total, masks)
        return total

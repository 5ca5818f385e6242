"""Secure aggregation in the simulator: every device's SecAgg+ crypto, really run.

For each round the driver plays the coordinator's :class:`SecAggServer`, and
every cohort member runs its own :class:`SecAggClient` through the four
rounds of :mod:`fedge.secagg.protocol` (real X25519, HKDF, AES-GCM and
Shamir). The device side lives in :class:`SecAggDevices`: in the driver for
the ``inline`` backend (and for ``ray``, whose actors do not host it), and in
each worker of the ``processes`` backend for the devices that worker trains,
so the per-device crypto of rounds 0, 1 and 3 runs on every core (the driver
only routes the messages, as a coordinator would). The masking of round 2
happens where the device trains: the job carries the device's
:class:`MaskingMaterial` (bytes only, so it pickles) and the round's shared
fixed-point grid; the worker encodes its delta, masks it and adds it to the
partial masked sum it returns. The server only ever sees masked sums,
unmasks their total and the grid decodes FedAvg's weighted mean exactly.

With distributed DP (``--dp distributed``) each device's job also says how
to privatize: :func:`fedge.privacy.distributed.privatize_on_grid` clips the
update, maps it onto the grid and adds the device's noise share, so the
coordinator's unmasked sum is already noised. Every update then weighs 1,
and the round's ``min_survivors`` (``RoundSetup``) is the number of shares
each device's noise assumes: honest devices refuse to unmask fewer.

Dropouts are drawn per phase (``SimConfig.secagg_dropout``: advertise, share,
upload, unmask) so a run shows which losses the round survives; a round
left below the threshold is abandoned and reveals nothing. A device whose own
checks fail (too few neighbours left, say) drops out, as a real one would.

Simulated devices take their key material from seeded generators keyed by
(seed, round, device), and distributed-DP noise from
``noise_generator(seed, round, device)``, so a run is reproducible and the
same on every backend; a real agent uses the operating system's randomness.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge import params as P
from fedge.encoding.fixedpoint import FixedPoint, max_bits
from fedge.errors import ConfigError
from fedge.params import Params, ParamsSpec
from fedge.privacy.distributed import privatize_on_grid
from fedge.privacy.mechanisms import noise_generator
from fedge.privacy.session import PrivacySession
from fedge.secagg.primitives import SecAggError
from fedge.secagg.protocol import (
    AdvertiseKeys,
    MaskingMaterial,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    apply_masks,
    default_parameters,
)
from fedge.strategies.base import Aggregate, Strategy

__all__ = ["PHASES", "SecAggDevices", "SecAggJob", "SimSecAgg", "check_dropout"]

logger = logging.getLogger(__name__)

PHASES = ("advertise", "share", "upload", "unmask")
_DEFAULT_BITS_CAP = 24  # finer grids only cost nothing but headroom; 24 bits leaves 2^-23 steps
_SECAGG_STREAM = 3  # the engine's stream purposes are 1 and 2
#: A device's seeded randomness is read in blocks: numpy's ``Generator.bytes``
#: costs ~20 us a call, and a client asks for it ~40 times a round.
_BYTES_BLOCK = 4096

#: ``method(shared, {device name: item}) -> {device name: result}``: how the
#: driver reaches the device side, wherever it lives.
DeviceCall = Callable[[str, Any, Mapping[str, Any]], dict[str, Any]]


def check_dropout(dropout: Mapping[str, float]) -> None:
    """Refuse unknown phases or fractions outside [0, 1)."""
    for phase, frac in dropout.items():
        if phase not in PHASES:
            raise ConfigError(
                f"--secagg-dropout: unknown phase {phase!r}; known: {', '.join(PHASES)}"
            )
        if not (np.isfinite(frac) and 0 <= frac < 1):
            raise ConfigError(f"--secagg-dropout {phase} must be in [0, 1), got {frac}")


def _stream(seed: int, r: int, who: int) -> np.random.Generator:
    """A stream keyed by (seed, round, who): a device id, -1 (the round), -2 (unmask)."""
    return np.random.default_rng([seed, _SECAGG_STREAM, r, who + 2])


class _DeviceBytes:
    """A simulated device's ``random_bytes``: its seeded generator, read a block at a time."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._pool = b""

    def __call__(self, n: int) -> bytes:
        if n > len(self._pool):
            self._pool += self._rng.bytes(max(_BYTES_BLOCK, n))
        out, self._pool = self._pool[:n], self._pool[n:]
        return out


class SecAggDevices:
    """The device side of SecAgg+ for the simulated devices one process hosts.

    Each device is its own :class:`SecAggClient` with its own keys; this
    class only holds them between the phases of a round and answers the
    driver's messages for many devices at once. Every method takes the
    message all devices receive (``shared``) and per-device items, and returns
    per-device answers; a device whose own checks refuse the round drops out
    (it has no answer), as a real device would stop.
    """

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._clients: dict[str, SecAggClient] = {}

    def call(self, method: str, shared: Any, items: Mapping[str, Any]) -> dict[str, Any]:
        """Dispatch a driver message (the processes workers receive them by name)."""
        handlers: dict[str, Callable[[Any, Mapping[str, Any]], dict[str, Any]]] = {
            "advertise": self.advertise, "share": self.share, "receive": self.receive,
            "unmask": self.unmask,
        }
        handler = handlers.get(method)
        if handler is None:
            raise ValueError(f"unknown secure-aggregation step {method!r}")
        return handler(shared, items)

    def advertise(self, setup: RoundSetup, items: Mapping[str, None]) -> dict[str, AdvertiseKeys]:
        """Round 0: new clients (new keys) for this round's devices; their public keys."""
        self._clients = {
            d: SecAggClient(setup, d, random_bytes=_DeviceBytes(_stream(self._seed, setup.round_id,
                                                                        int(d))))
            for d in items
        }
        return {d: c.advertise_keys() for d, c in self._clients.items()}

    def share(self, directory: Mapping[str, AdvertiseKeys],
              items: Mapping[str, None]) -> dict[str, ShareKeys]:
        """Round 1: each device's encrypted shares for its neighbours."""
        return self._each(items, lambda c, _: c.share_keys(directory))

    def receive(self, _: None, items: Mapping[str, Mapping[str, bytes]]) -> dict[str, MaskingMaterial]:
        """Round 2's setup: each device decrypts its shares and derives its masks."""
        return self._each(items, lambda c, inbox: c.receive_shares(inbox))

    def unmask(self, request: UnmaskRequest, items: Mapping[str, None]) -> dict[str, UnmaskShares]:
        """Round 3: the shares each device reveals (its masked input was sent by its job)."""
        def answer(client: SecAggClient, _: None) -> UnmaskShares:
            client.mark_uploaded()
            return client.unmask(request)

        out = self._each(items, answer)
        self._clients = {}  # the round is over: its keys are gone
        return out

    def _each(self, items: Mapping[str, Any], step: Callable[[SecAggClient, Any], Any]) -> dict[str, Any]:
        out = {}
        for d, item in items.items():
            client = self._clients.get(d)
            if client is None:
                continue  # not in this round here (it dropped earlier)
            try:
                out[d] = step(client, item)
            except SecAggError as e:
                logger.debug("device %s leaves the secure round: %s", d, e.reason)
                del self._clients[d]
        return out


@dataclass(frozen=True)
class SecAggJob:
    """What a device needs to upload its masked vector (picklable).

    ``dp_clip_norm`` set: distributed DP, the update goes through
    :func:`~fedge.privacy.distributed.privatize_on_grid` (clip, grid, noise
    share from ``noise_generator(*dp_noise_key)``) instead of ``grid.encode``.
    """

    material: MaskingMaterial
    grid: FixedPoint
    dp_clip_norm: float | None = None
    dp_noise_key: tuple[int, int, int] = (0, 0, 0)  # (seed, round, device)

    def add_masked(
        self,
        total: npt.NDArray[np.uint32] | None,
        delta: Params,
        weight: int,
        rng: np.random.Generator,
    ) -> npt.NDArray[np.uint32]:
        """Encode and mask ``delta``; add it to the partial masked sum ``total`` (mod 2^32)."""
        flat = P.flatten(delta, np.float64)
        if self.dp_clip_norm is None:
            vector = self.grid.encode(flat, int(weight), rng, overwrite=True)
        else:
            vector = privatize_on_grid(flat, clip_norm=self.dp_clip_norm, grid=self.grid,
                                       rng=noise_generator(*self.dp_noise_key))
        apply_masks(self.material, vector)
        if total is None:
            return vector
        np.add(total, vector, out=total)
        return total


class SimSecAgg:
    """The simulator's secure-aggregation driver for one run.

    Args:
        privacy: the run's DP session when it is ``--dp distributed`` (its
            plan fixes the grid's bits and each device's noise share).
        min_contributors: distributed DP: the shares each device's noise
            assumes, capped at the round's cohort and never below its
            threshold; ``None``: the threshold (the fewest uploads secure
            aggregation ever reveals a sum of).
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        k: int | None,
        threshold: int | None,
        clip: float,
        bits: int | None,
        max_weight: int,
        dropout: Mapping[str, float],
        seed: int,
        cohort: int | None,
        privacy: PrivacySession | None = None,
        min_contributors: int | None = None,
    ) -> None:
        if getattr(strategy, "secagg_compatible", True) is False:
            raise ConfigError(
                f"--secagg cannot be used with strategy {strategy.name!r}: it needs every "
                "device's individual update, and secure aggregation reveals only their sum"
            )
        if getattr(strategy, "needs_every_update", False):
            raise ConfigError(
                f"--secagg cannot be used with strategy {strategy.name!r}: it keeps every update"
            )
        check_dropout(dropout)
        if cohort is not None and cohort < 3:
            raise ConfigError(f"--secagg needs a cohort of at least 3 devices, got {cohort}")
        if k is not None and (k < 2 or k % 2):
            raise ConfigError(f"--secagg-k must be an even number >= 2, got {k}")
        if threshold is not None and threshold < 2:
            raise ConfigError(f"--secagg-threshold must be >= 2, got {threshold}")
        if privacy is not None and privacy.distributed is None:
            raise ConfigError("SimSecAgg's privacy session must be a distributed-DP one")
        if min_contributors is not None and (privacy is None or min_contributors < 1):
            raise ConfigError("--dp-min-contributors needs --dp distributed and a count >= 1, "
                              f"got {min_contributors}")
        if bits is not None and cohort is not None and privacy is None:
            FixedPoint(clip=clip, bits=bits, max_weight=max_weight, cohort_size=cohort)
        self._k, self._t, self._clip, self._bits = k, threshold, clip, bits
        self._max_weight = max_weight
        self._dropout = dict(dropout)
        self._seed = seed
        self._privacy = privacy
        self._min_contributors = min_contributors
        self._local = SecAggDevices(seed)

    def parameters(self, n: int) -> tuple[int, int]:
        """(k, threshold) for a cohort of ``n``: the flags, else :func:`default_parameters`."""
        rate = max([*self._dropout.values(), 0.1])
        k_default, _ = default_parameters(n, dropout_rate=min(rate, 0.9))
        k = self._k if self._k is not None else k_default
        k = min(n - 1, k)
        degree = k
        t = self._t if self._t is not None else degree // 2 + 1
        if not degree // 2 < t <= degree:
            raise ConfigError(
                f"--secagg-threshold {t} must be in {degree // 2 + 1}..{degree} for a cohort of "
                f"{n} with k={k}"
            )
        return k, t

    def contributors(self, n: int, threshold: int) -> int:
        """Distributed DP: the uploads a round of ``n`` needs, the shares each device's noise assumes."""
        if self._min_contributors is None:
            return threshold
        return max(threshold, min(self._min_contributors, n))

    def _drop(self, rng: np.random.Generator, phase: str, alive: list[str]) -> list[str]:
        frac = self._dropout.get(phase, 0.0)
        if not frac:
            return alive
        keep = rng.random(len(alive)) >= frac
        return [d for d, k in zip(alive, keep, strict=True) if k]

    def _grid(self, n: int, threshold: int) -> tuple[FixedPoint, int]:
        """The round's grid, and the uploads it needs (0: the threshold)."""
        if self._privacy is None:
            bits = self._bits if self._bits is not None else min(max_bits(n), _DEFAULT_BITS_CAP)
            return FixedPoint(clip=self._clip, bits=bits, max_weight=self._max_weight,
                              cohort_size=n), 0
        plan = self._privacy.distributed
        assert plan is not None
        m = self.contributors(n, threshold)
        return FixedPoint(clip=min(self._clip, self._privacy.clip_norm), bits=plan.bits, max_weight=1,
                          cohort_size=n, noise_stddev=self._privacy.noise_share_stddev(m)), m

    def prepare(
        self, r: int, params: Params, device_ids: Sequence[int], devices: DeviceCall | None = None,
    ) -> tuple[SecAggServer, dict[int, SecAggJob], list[int], FixedPoint]:
        """Rounds 0 and 1 for ``device_ids``; the jobs of the devices that go on to upload.

        ``devices`` reaches the device side where a backend hosts it (its
        ``secagg_call``); ``None``: in this process.

        Raises:
            SecAggError: the round fell below the threshold (abort).
        """
        call = devices if devices is not None else self._local.call
        n = len(device_ids)
        if n < 3:
            raise SecAggError("below_threshold", f"a cohort of {n} is too small for secure "
                              "aggregation (at least 3)")
        k, t = self.parameters(n)
        grid, need = self._grid(n, t)
        rng = _stream(self._seed, r, -1)
        setup = RoundSetup(r, tuple(str(d) for d in device_ids), k, t, rng.bytes(32),
                           P.num_values(params) + 1, min_survivors=need)
        server = SecAggServer(setup)
        alive = self._drop(rng, "advertise", list(setup.cohort))
        keys = call("advertise", setup, dict.fromkeys(alive))
        for d in alive:
            if d in keys:
                server.receive_keys(d, keys[d])
        directory = server.close_keys()
        alive = self._drop(rng, "share", [d for d in alive if d in keys])
        shares = call("share", directory, dict.fromkeys(alive))
        for d in alive:
            if d in shares:
                server.receive_shares(d, shares[d])
        inbox = server.close_shares()
        alive = self._drop(rng, "upload", [d for d in alive if d in shares])
        materials = call("receive", None, {d: inbox[d] for d in alive})
        dp_clip = None if self._privacy is None else self._privacy.clip_norm
        jobs = {int(d): SecAggJob(materials[d], grid, dp_clip, (self._seed, r, int(d)))
                for d in alive if d in materials}
        gone = [int(d) for d in setup.cohort if int(d) not in jobs]
        return server, jobs, gone, grid

    def finish(
        self,
        r: int,
        server: SecAggServer,
        uploaded: Sequence[int],
        masked_sum: npt.NDArray[np.uint32] | None,
        spec: ParamsSpec,
        grid: FixedPoint,
        devices: DeviceCall | None = None,
    ) -> Aggregate:
        """Rounds 2 (close) and 3: unmask the sum of ``uploaded`` and decode the weighted mean.

        Raises:
            SecAggError: below the threshold (or distributed DP's minimum), or
                a secret could not be rebuilt (abort).
        """
        call = devices if devices is not None else self._local.call
        names = [str(d) for d in uploaded]
        if names and masked_sum is not None:
            server.receive_masked_sum(names, masked_sum)
        request = server.close_masked()
        answering = self._drop(_stream(self._seed, r, -2), "unmask", names)
        answers = call("unmask", request, dict.fromkeys(answering))
        for d in answering:
            if d in answers:
                server.receive_unmask(d, answers[d])
        total = server.unmask()
        mean, weight = grid.decode(total)
        return Aggregate(delta=P.unflatten(mean, spec), total_weight=float(weight),
                         count=len(uploaded))


"""Secure aggregation in the simulator: every device's SecAgg+ crypto, really run.

For each round the driver plays the coordinator's :class:`SecAggServer` and
every cohort member's :class:`SecAggClient` through the four rounds of
:mod:`fedge.secagg.protocol` (real X25519, HKDF, AES-GCM and Shamir). The
masking of round 2 happens where the device trains (this process or a worker
of the ``processes`` backend): the job carries the device's
:class:`MaskingMaterial` (bytes only, so it pickles) and the round's shared
fixed-point grid; the worker encodes its delta, masks it and adds it to the
partial masked sum it returns. The server only ever sees masked sums, unmasks
their total and the grid decodes FedAvg's weighted mean exactly.

Dropouts are drawn per phase (``SimConfig.secagg_dropout``: advertise, share,
upload, unmask) so a run shows which losses the round survives; a round
left below the threshold is abandoned and reveals nothing.

Simulated devices take their key material from seeded generators keyed by
(seed, round, device) so a run is reproducible; a real agent uses the
operating system's randomness.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedge import params as P
from fedge.encoding.fixedpoint import FixedPoint, max_bits
from fedge.errors import ConfigError
from fedge.params import Params, ParamsSpec
from fedge.secagg.primitives import SecAggError
from fedge.secagg.protocol import (
    MaskingMaterial,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    apply_masks,
    default_parameters,
)
from fedge.strategies.base import Aggregate, Strategy

__all__ = ["PHASES", "SecAggJob", "SecAggOutcome", "SimSecAgg", "check_dropout"]

logger = logging.getLogger(__name__)

PHASES = ("advertise", "share", "upload", "unmask")
_DEFAULT_BITS_CAP = 24  # finer grids only cost nothing but headroom; 24 bits leaves 2^-23 steps
_SECAGG_STREAM = 3  # the engine's stream purposes are 1 and 2


def check_dropout(dropout: Mapping[str, float]) -> None:
    """Refuse unknown phases or fractions outside [0, 1)."""
    for phase, frac in dropout.items():
        if phase not in PHASES:
            raise ConfigError(
                f"--secagg-dropout: unknown phase {phase!r}; known: {', '.join(PHASES)}"
            )
        if not (np.isfinite(frac) and 0 <= frac < 1):
            raise ConfigError(f"--secagg-dropout {phase} must be in [0, 1), got {frac}")


@dataclass(frozen=True)
class SecAggJob:
    """What a device needs to upload its masked vector (picklable)."""

    material: MaskingMaterial
    grid: FixedPoint

    def add_masked(
        self,
        total: npt.NDArray[np.uint32] | None,
        delta: Params,
        weight: int,
        rng: np.random.Generator,
    ) -> npt.NDArray[np.uint32]:
        """Encode and mask ``delta``; add it to the partial masked sum ``total`` (mod 2^32)."""
        vector = apply_masks(self.material, self.grid.encode(P.flatten(delta, np.float64),
                                                             int(weight), rng))
        if total is None:
            return vector
        np.add(total, vector, out=total)
        return total


@dataclass
class SecAggOutcome:
    """A secure round as the engine records it."""

    aggregate: Aggregate | None
    uploaded: list[int]
    dropped: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    train_loss_sum: float = 0.0
    train_loss_weight: float = 0.0
    train_s: float = 0.0
    abort_reason: str | None = None


class SimSecAgg:
    """The simulator's secure-aggregation driver for one run."""

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
        if bits is not None and cohort is not None:
            FixedPoint(clip=clip, bits=bits, max_weight=max_weight, cohort_size=cohort)
        self._k, self._t, self._clip, self._bits = k, threshold, clip, bits
        self._max_weight = max_weight
        self._dropout = dict(dropout)
        self._seed = seed

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

    def _rng(self, r: int, who: int) -> np.random.Generator:
        """A stream keyed by (seed, round, who): a device id, -1 (the round), -2 (unmask)."""
        return np.random.default_rng([self._seed, _SECAGG_STREAM, r, who + 2])

    def _drop(self, rng: np.random.Generator, phase: str, alive: list[str]) -> list[str]:
        frac = self._dropout.get(phase, 0.0)
        if not frac:
            return alive
        keep = rng.random(len(alive)) >= frac
        return [d for d, k in zip(alive, keep, strict=True) if k]

    def prepare(
        self, r: int, params: Params, device_ids: Sequence[int]
    ) -> tuple[SecAggServer, dict[str, SecAggClient], dict[int, SecAggJob], list[int], FixedPoint]:
        """Rounds 0 and 1 for ``device_ids``; the jobs of the devices that go on to upload.

        Raises:
            SecAggError: the round fell below the threshold (abort).
        """
        n = len(device_ids)
        if n < 3:
            raise SecAggError("below_threshold", f"a cohort of {n} is too small for secure "
                              "aggregation (at least 3)")
        k, t = self.parameters(n)
        bits = self._bits if self._bits is not None else min(max_bits(n), _DEFAULT_BITS_CAP)
        grid = FixedPoint(clip=self._clip, bits=bits, max_weight=self._max_weight, cohort_size=n)
        rng = self._rng(r, -1)
        setup = RoundSetup(r, tuple(str(d) for d in device_ids), k, t, rng.bytes(32),
                           P.num_values(params) + 1)
        server = SecAggServer(setup)
        clients = {
            name: SecAggClient(setup, name, random_bytes=self._rng(r, int(name)).bytes)
            for name in setup.cohort
        }
        alive = self._drop(rng, "advertise", list(setup.cohort))
        for d in alive:
            server.receive_keys(d, clients[d].advertise_keys())
        directory = server.close_keys()
        alive = self._drop(rng, "share", alive)
        for d in alive:
            server.receive_shares(d, clients[d].share_keys(directory))
        inbox = server.close_shares()
        alive = self._drop(rng, "upload", alive)
        jobs = {int(d): SecAggJob(clients[d].receive_shares(inbox[d]), grid) for d in alive}
        gone = [int(d) for d in setup.cohort if int(d) not in jobs]
        return server, clients, jobs, gone, grid

    def finish(
        self,
        r: int,
        server: SecAggServer,
        clients: Mapping[str, SecAggClient],
        uploaded: Sequence[int],
        masked_sum: npt.NDArray[np.uint32] | None,
        spec: ParamsSpec,
        grid: FixedPoint,
    ) -> Aggregate:
        """Rounds 2 (close) and 3: unmask the sum of ``uploaded`` and decode the weighted mean.

        Raises:
            SecAggError: below the threshold, or a secret could not be rebuilt (abort).
        """
        names = [str(d) for d in uploaded]
        if names and masked_sum is not None:
            server.receive_masked_sum(names, masked_sum)
        request = server.close_masked()
        answering = self._drop(self._rng(r, -2), "unmask", names)
        for d in answering:
            clients[d].mark_uploaded()
            server.receive_unmask(d, clients[d].unmask(request))
        total = server.unmask()
        mean, weight = grid.decode(total)
        return Aggregate(delta=P.unflatten(mean, spec), total_weight=float(weight),
                         count=len(uploaded))

"""Secure aggregation over the network: the coordinator's side of one SecAgg+ round attempt.

A secure round runs the four phases of :mod:`fedge.secagg.protocol` (Bell et
al., CCS 2020, on Bonawitz et al., CCS 2017) as request/response pairs under
``/v1/rounds/{round}/secagg/``, all pulled by the agents (docs/secagg.md)::

    phase       a device sends (POST)              then fetches (GET) once the phase closed
    advertise   keys    its two public keys        keys    its neighbours' public keys
    share       shares  encrypted share pairs      shares  the ciphertexts addressed to it
    upload      masked  its packed masked vector   unmask  who survived, who dropped
    unmask      unmask  Shamir shares              -

A GET before its phase closed answers ``ready: false`` and when to ask again;
with ``wait_s`` it is held open until the phase closes or that long passes
(a long poll: one request per phase rather than one per poll period).
A phase closes as soon as every device still in it has answered, or at its
deadline: keys ``advertise_s`` after the round opened, shares ``share_s``
after the keys phase closed, the masked upload ``rounds.deadline_s`` after
the opening (as a plaintext round's update: training happens in this phase),
unmask shares ``unmask_s`` after the upload closed. A device is told the
latest each can be (the phases before it taking all their time). A device
that missed a phase is out of the round; the ones that remain carry it on,
and the pairwise masks of those that shared keys but did not upload are
rebuilt from their neighbours' shares. At any phase with fewer than the
threshold, the attempt is abandoned and nothing is unmasked; the round is
retried with a fresh cohort as a plaintext round is.

What the coordinator sees: public keys, ciphertexts it cannot read, each
device's masked vector (uniformly random on its own), who took part in each
phase, and in the end the sum of the survivors' vectors on the shared grid.
The device's identity comes from the transport (its TLS client certificate),
never from a body. Every message the state machine refuses is a
:class:`~fedge.errors.ProtocolError` with a code of
:data:`fedge.wire.REFUSALS` naming the device; none ends the round.

Nothing here is reused across attempts: every attempt gets a fresh graph seed
from the operating system, its setup is bound to (round, attempt), and the
devices draw fresh keys for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedge import params as P
from fedge.encoding.fixedpoint import FixedPoint, max_bits
from fedge.errors import ConfigError, ProtocolError
from fedge.params import Params, ParamsSpec
from fedge.secagg.primitives import SecAggError
from fedge.secagg.protocol import (
    AdvertiseKeys,
    MaskedInput,
    RoundSetup,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    default_parameters,
)
from fedge.strategies.base import Aggregate

if TYPE_CHECKING:
    from fedge.privacy.session import PrivacySession
from fedge.wire import (
    REFUSALS,
    SecAggDirectory,
    SecAggInbox,
    SecAggKeyPair,
    SecAggKeys,
    SecAggPlan,
    SecAggShares,
    SecAggUnmaskRequest,
    SecAggUnmaskShares,
    secagg_setup_id,
)

__all__ = ["PHASES", "SecureRound", "open_secure_round", "secagg_parameters"]

logger = logging.getLogger(__name__)

#: The phases a device can drop out in, as the simulator names them (``secagg_dropped_<phase>``).
PHASES = ("advertise", "share", "upload", "unmask")
_DEFAULT_BITS_CAP = 24  # as the simulator: finer grids cost only headroom
_DEFAULT_DROPOUT = 0.1
_UINT32_MAX = 2**32 - 1


class _Phase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    UPLOAD = "upload"
    UNMASK = "unmask"
    UNMASKING = "unmasking"  # the coordinator rebuilds the masks; no message is taken
    DONE = "done"
    ABORTED = "aborted"


def secagg_parameters(
    n: int, *, k: int | None, threshold: int | None, dropout_rate: float | None
) -> tuple[int, int]:
    """``(k, threshold)`` for a cohort of ``n``: the configured values, else :func:`default_parameters`.

    ``k`` is capped at ``n - 1`` (the complete graph); the threshold must stay
    in ``k/2 + 1 .. k`` (more than half the neighbours: see docs/secagg.md).

    Raises:
        ConfigError: ``n < 3``, or a threshold outside that range for this ``n``.
    """
    rate = _DEFAULT_DROPOUT if dropout_rate is None else dropout_rate
    default_k, _ = default_parameters(n, dropout_rate=rate)
    k_eff = min(n - 1, default_k if k is None else k)
    t = k_eff // 2 + 1 if threshold is None else threshold
    if not k_eff // 2 < t <= k_eff:
        raise ConfigError(
            f"secagg.threshold {t} must be in {k_eff // 2 + 1}..{k_eff} for a cohort of {n} "
            f"(k = {k_eff} neighbours)"
        )
    return k_eff, t


def _refusal(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail, REFUSALS[reason])


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The protocol's :class:`SecAggError` as the refusal it is over HTTP (its code, its status)."""
    try:
        yield
    except SecAggError as e:
        raise ProtocolError(e.reason, e.detail, REFUSALS.get(e.reason, 400)) from None


@dataclass(frozen=True)
class PhaseTimes:
    """The phases' deadlines, on the coordinator's clock: keys and upload at fixed instants, the
    share and unmask phases a length after the phase before them closed."""

    opened_at: float
    advertise_at: float
    share_s: float
    upload_at: float
    unmask_s: float

    @property
    def latest_share_at(self) -> float:
        return self.advertise_at + self.share_s

    @property
    def latest_unmask_at(self) -> float:
        return self.upload_at + self.unmask_s


class SecureRound:
    """One secure round attempt on the coordinator: the :class:`SecAggServer` behind the endpoints.

    Methods named after requests check the phase and the device, hand the
    message to the state machine and return the reply; :meth:`advance`
    closes the phases that are due. All of it runs on the server's event loop
    thread except the unmasking itself, during which no message is taken.

    Args:
        setup: the SecAgg+ setup every cohort member receives.
        grid: the round's shared fixed-point grid.
        weighted: whether devices encode their example count (else weight 1).
        times: the phases' deadlines.
        poll_s: how long a device should wait before asking again.
        round_id, attempt: the round attempt (every message must name it).
        wake: called when a message may let a phase close early.
    """

    def __init__(
        self, *, setup: RoundSetup, grid: FixedPoint, weighted: bool, times: PhaseTimes, poll_s: float,
        round_id: int, attempt: int, wake: Callable[[], None],
    ) -> None:
        self.setup = setup
        self.grid = grid
        self.weighted = weighted
        self.times = times
        self.poll_s = poll_s
        self.round_id = round_id
        self.attempt = attempt
        self._wake = wake
        self._server: SecAggServer | None = SecAggServer(setup)
        self._phase = _Phase.ADVERTISE
        self._index = {name: i for i, name in enumerate(setup.cohort)}
        self._neighbours = setup.neighbours()
        self.advertised: set[str] = set()
        self.shared: set[str] = set()
        self.uploaded: set[str] = set()
        self.answered: set[str] = set()
        self._directory: dict[str, AdvertiseKeys] = {}
        self._inbox: dict[str, dict[str, bytes]] = {}
        self._request: UnmaskRequest | None = None
        self._advertise_closed_at: float | None = None
        self._upload_closed_at: float | None = None
        #: When the key phases ended (devices train from then on).
        self.keys_closed_at: float | None = None
        #: The unmasked sum of the survivors' vectors (uint32, two's complement), once done.
        self.total: npt.NDArray[np.uint32] | None = None
        #: Why the attempt was abandoned, and in which phase, if it was.
        self.abort_reason: str | None = None
        self.aborted_in: str | None = None
        self.phase_s: dict[str, float] = {}
        self.unmask_cpu_s = 0.0
        self._changed = asyncio.Event()  # set (and replaced) whenever the phase moves on

    # ------------------------------------------------------------ state

    @property
    def phase(self) -> str:
        return self._phase.value

    @property
    def over(self) -> bool:
        """Unmasked or abandoned: the round can close."""
        return self._phase in (_Phase.DONE, _Phase.ABORTED)

    def invites(self, device: str, now: float) -> bool:
        """Whether ``device`` may still be told to join (it must advertise keys in time)."""
        return (self._phase is _Phase.ADVERTISE and device not in self.advertised
                and now < self.times.advertise_at)

    def plan(self, now: float) -> SecAggPlan:
        """The setup, grid and deadlines a cohort member is sent with its invitation."""
        t = self.times
        return SecAggPlan(
            cohort=list(self.setup.cohort), k=self.setup.k, threshold=self.setup.threshold,
            graph_seed=self.setup.graph_seed, vector_length=self.setup.vector_length,
            clip=self.grid.clip, bits=self.grid.bits, max_weight=self.grid.max_weight,
            wire_bits=self.grid.wire_bits, weighted=self.weighted,
            noise_stddev=self.grid.noise_stddev, min_survivors=self.setup.min_survivors,
            advertise_deadline_s=max(0.0, t.advertise_at - now),
            share_deadline_s=max(0.0, t.latest_share_at - now),
            unmask_deadline_s=max(0.0, t.latest_unmask_at - now), poll_s=self.poll_s,
        )

    def status(self) -> dict[str, object]:
        """For ``/v1/status``: the phase and how many devices answered each one so far."""
        return {"phase": self.phase, "advertised": len(self.advertised), "shared": len(self.shared),
                "uploaded": len(self.uploaded), "answered": len(self.answered)}

    async def wait_change(self, timeout_s: float) -> None:
        """Wait until the phase moves on, or ``timeout_s`` passes (for a long-polled result)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def _moved_on(self, phase: _Phase) -> None:
        self._phase = phase
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _check(self, attempt: int, device: str, phase: _Phase, what: str) -> SecAggServer:
        if attempt != self.attempt:
            raise _refusal("closed", f"round {self.round_id} attempt {attempt} has ended")
        if self._phase is not phase or self._server is None:
            raise _refusal("out_of_phase", f"device {device!r}: {what} during the {self.phase} phase of "
                                           f"round {self.round_id} attempt {self.attempt}")
        return self._server

    def _check_poll(self, attempt: int) -> None:
        if attempt != self.attempt:
            raise _refusal("closed", f"round {self.round_id} attempt {attempt} has ended")

    def _pending(self) -> dict[str, object]:
        return {"round": self.round_id, "attempt": self.attempt, "ready": False, "retry_s": self.poll_s}

    def _neighbour_names(self, device: str) -> list[str]:
        return [self.setup.cohort[v - 1] for v in self._neighbours[self._index[device]]]

    # ------------------------------------------------------------ requests

    def receive_keys(self, device: str, msg: SecAggKeys) -> None:
        """Phase 0: ``device``'s public keys."""
        server = self._check(msg.attempt, device, _Phase.ADVERTISE, "advertised keys")
        with _refusals():
            server.receive_keys(device, AdvertiseKeys(c_pk=msg.c_pk, s_pk=msg.s_pk))
        self.advertised.add(device)
        if len(self.advertised) == len(self.setup.cohort):
            self._wake()

    def directory(self, device: str, attempt: int) -> SecAggDirectory:
        """Phase 0's result for ``device``: its own keys and its advertising neighbours'."""
        self._check_poll(attempt)
        if self._phase is _Phase.ADVERTISE:
            return SecAggDirectory.model_validate(self._pending())
        if device not in self.advertised:
            raise _refusal("out_of_phase", f"device {device!r} did not advertise keys in time")
        keys = {name: SecAggKeyPair(c_pk=self._directory[name].c_pk, s_pk=self._directory[name].s_pk)
                for name in [device, *self._neighbour_names(device)] if name in self._directory}
        return SecAggDirectory(round=self.round_id, attempt=self.attempt, ready=True, keys=keys)

    def receive_shares(self, device: str, msg: SecAggShares) -> None:
        """Phase 1: ``device``'s encrypted share pairs, by receiver (it must be a neighbour)."""
        server = self._check(msg.attempt, device, _Phase.SHARE, "shared keys")
        with _refusals():
            server.receive_shares(device, ShareKeys(ciphertexts=dict(msg.shares)))
        self.shared.add(device)
        if self.shared >= self.advertised:
            self._wake()

    def inbox(self, device: str, attempt: int) -> SecAggInbox:
        """Phase 1's result for ``device``: the ciphertexts its neighbours addressed to it."""
        self._check_poll(attempt)
        if self._phase in (_Phase.ADVERTISE, _Phase.SHARE):
            return SecAggInbox.model_validate(self._pending())
        if device not in self.shared:
            raise _refusal("out_of_phase", f"device {device!r} did not share keys in time")
        return SecAggInbox(round=self.round_id, attempt=self.attempt, ready=True,
                           shares=self._inbox.get(device, {}))

    def accepts_upload(self, device: str, attempt: int) -> None:
        """Refuse at once, before its frame is decoded, a masked vector this round cannot take."""
        self._check(attempt, device, _Phase.UPLOAD, "uploaded a masked vector")

    def receive_masked(self, device: str, attempt: int, vector: npt.NDArray[np.uint32]) -> None:
        """Phase 2: ``device``'s masked vector, summed at once (memory O(model), not O(cohort))."""
        server = self._check(attempt, device, _Phase.UPLOAD, "uploaded a masked vector")
        with _refusals():
            server.receive_masked(device, MaskedInput(vector))
        self.uploaded.add(device)
        if self.uploaded >= self.shared:
            self._wake()

    def unmask_request(self, device: str, attempt: int) -> SecAggUnmaskRequest:
        """Phase 2's result: the survivors and the dropped, for a survivor to answer."""
        self._check_poll(attempt)
        if self._request is None:
            if self._phase in (_Phase.ADVERTISE, _Phase.SHARE, _Phase.UPLOAD):
                return SecAggUnmaskRequest.model_validate(self._pending())
            raise _refusal("closed", f"round {self.round_id} attempt {self.attempt} has ended")
        if device not in self.uploaded:
            raise _refusal("out_of_phase", f"device {device!r} did not upload a masked vector in time")
        return SecAggUnmaskRequest(round=self.round_id, attempt=self.attempt, ready=True,
                                   survivors=list(self._request.survivors),
                                   dropped=list(self._request.dropped))

    def receive_unmask(self, device: str, msg: SecAggUnmaskShares) -> None:
        """Phase 3: a survivor's Shamir shares, each of the secret the request asked for."""
        server = self._check(msg.attempt, device, _Phase.UNMASK, "sent unmask shares")
        with _refusals():
            server.receive_unmask(device, UnmaskShares(self_shares=dict(msg.self_shares),
                                                       key_shares=dict(msg.key_shares)))
        self.answered.add(device)
        if self.answered >= self.uploaded:
            self._wake()

    # ------------------------------------------------------------ the driver

    def _due(self, now: float, aborted: Collection[str], target: int) -> bool:
        t, phase = self.times, self._phase
        if phase is _Phase.ADVERTISE:
            return len(self.advertised) == len(self.setup.cohort) or now >= t.advertise_at
        if phase is _Phase.SHARE:
            return self.shared >= self.advertised or now >= self.next_deadline()
        if phase is _Phase.UPLOAD:
            settled = self.uploaded | (set(aborted) & self.shared)
            return settled >= self.shared or len(self.uploaded) >= target or now >= t.upload_at
        if phase is _Phase.UNMASK:
            return self.answered >= self.uploaded or now >= self.next_deadline()
        return False

    def next_deadline(self) -> float:
        """The instant the open phase closes at the latest."""
        t = self.times
        if self._phase is _Phase.ADVERTISE:
            return t.advertise_at
        if self._phase is _Phase.SHARE:
            return (self._advertise_closed_at or t.advertise_at) + t.share_s
        if self._phase is _Phase.UPLOAD:
            return t.upload_at
        return (self._upload_closed_at or t.upload_at) + t.unmask_s

    async def advance(self, now: float, *, aborted: Collection[str], target: int, min_updates: int) -> bool:
        """Close every phase that is due; True once the round is over (unmasked or abandoned).

        ``aborted`` are the devices that said they stopped training (they will
        not upload), ``target`` the uploads after which the upload phase closes
        early (the cohort size), ``min_updates`` the fewest the round may use.
        """
        while not self.over and self._due(now, aborted, target):
            try:
                await self._close(now, min_updates)
            except SecAggError as e:
                self._abort(e.detail if e.device is None else f"{e.device}: {e.detail}")
        return self.over

    async def _close(self, now: float, min_updates: int) -> None:
        server = self._server
        assert server is not None
        phase = self._phase
        if phase is _Phase.ADVERTISE:
            self._directory = server.close_keys()
            self._advertise_closed_at = now
            self._moved_on(_Phase.SHARE)
        elif phase is _Phase.SHARE:
            self._inbox = server.close_shares()
            self.phase_s["keys"] = now - self.times.opened_at
            self.keys_closed_at = now
            self._moved_on(_Phase.UPLOAD)
        elif phase is _Phase.UPLOAD:
            if len(self.uploaded) < min_updates:
                raise SecAggError("below_threshold", f"only {len(self.uploaded)} masked vectors arrived; "
                                  f"the round needs {min_updates}: nothing is unmasked")
            self._request = server.close_masked()
            self._upload_closed_at = now
            self._moved_on(_Phase.UNMASK)
        elif phase is _Phase.UNMASK:
            self._moved_on(_Phase.UNMASKING)
            t0 = time.perf_counter()
            total, cpu_s = await asyncio.to_thread(_unmask, server, self.grid)
            self.unmask_cpu_s = cpu_s
            self._server = None
            self._check_total(total)
            self.total = total
            self.phase_s["unmask"] = (now - (self._upload_closed_at or now)) + (time.perf_counter() - t0)
            self._moved_on(_Phase.DONE)
            logger.info("round %d attempt %d: the sum of %d masked vectors unmasked (%d devices dropped, "
                        "%d did not answer the unmask request)", self.round_id, self.attempt,
                        len(self.uploaded), len(self.shared - self.uploaded),
                        len(self.uploaded - self.answered))

    def _check_total(self, total: npt.NDArray[np.uint32]) -> None:
        """Refuse a sum no honest cohort can produce (a device sent a vector off the grid)."""
        n = len(self.uploaded)
        weight = int(total[-1])
        high = n * self.grid.max_weight  # every device encodes a weight in 1..max_weight
        if not n <= weight <= high:
            raise SecAggError("bad_share", f"the unmasked total weight {weight} is outside {n}..{high}: "
                              "a device sent a vector off the round's grid; the round is abandoned")
        top = int(np.max(np.abs(total[:-1].view(np.int32).astype(np.int64)))) if total.size > 1 else 0
        # With distributed DP the sum also holds every device's noise share: the grid's bound
        # (for the whole cohort) leaves NOISE_TAIL standard deviations of it.
        if top > (n * self.grid.levels if self.grid.noise_stddev == 0 else self.grid.sum_bound):
            raise SecAggError("bad_share", f"an unmasked value ({top}) exceeds what {n} devices on the grid "
                              "can sum to: a device sent a vector off the grid; the round is abandoned")

    def _abort(self, reason: str) -> None:
        self.aborted_in = {_Phase.UNMASKING: "unmask"}.get(self._phase, self._phase.value)
        self.abort_reason = reason
        self._moved_on(_Phase.ABORTED)
        self._server = None  # the masked sum goes with it: nothing of an abandoned attempt is revealed
        logger.warning("round %d attempt %d: secure aggregation abandoned in the %s phase: %s",
                       self.round_id, self.attempt, self.aborted_in, reason)

    # ------------------------------------------------------------ the result

    def aggregate(self, spec: ParamsSpec) -> Aggregate:
        """The survivors' weighted mean delta, decoded on the round's grid (exact FedAvg weights).

        Raises:
            ValueError: the round was not unmasked.
        """
        if self.total is None:
            raise ValueError(f"round {self.round_id} attempt {self.attempt} has no unmasked sum")
        mean, weight = self.grid.decode(self.total)
        return Aggregate(delta=P.unflatten(mean, spec), total_weight=float(weight), count=len(self.uploaded))

    def metrics(self) -> dict[str, float]:
        """The attempt's secure-aggregation figures, as the store keeps them with the round."""
        out: dict[str, float] = {
            "secagg_k": float(self.setup.k), "secagg_threshold": float(self.setup.threshold),
            "secagg_bits": float(self.grid.bits), "secagg_wire_bits": float(self.grid.wire_bits),
            "secagg_survivors": float(len(self.uploaded)),
        }
        before = [set(self.setup.cohort), self.advertised, self.shared, self.uploaded]
        after = [self.advertised, self.shared, self.uploaded, self.answered]
        # Only phases that closed: a dropout is a device that missed its phase's end.
        for name, was, now_in in list(zip(PHASES, before, after, strict=True))[: self._stage()]:
            out[f"secagg_dropped_{name}"] = float(len(was - now_in))
        if self.total is not None:  # the coordinator's CPU to rebuild and remove the masks
            out["secagg_unmask_cpu_s"] = self.unmask_cpu_s
        if self.aborted_in is not None:
            out[f"secagg_aborted_{self.aborted_in}"] = 1.0
        out.update({f"phase_{name}_s": s for name, s in self.phase_s.items()})
        return out

    def _stage(self) -> int:
        """How many phases closed: those before the open one; with the one it failed in if abandoned."""
        order = {"advertise": 0, "share": 1, "upload": 2, "unmask": 3, "unmasking": 3, "done": 4}
        if self._phase is _Phase.ABORTED:
            return order[self.aborted_in or "advertise"] + 1
        return order[self._phase.value]


def _unmask(server: SecAggServer, grid: FixedPoint) -> tuple[npt.NDArray[np.uint32], float]:
    """Rebuild the masks and take them off the sum (in a worker thread); the sum and its CPU seconds."""
    t0 = time.thread_time()
    total = widen(server.unmask(), grid.wire_bits)
    return total, time.thread_time() - t0


def widen(total: npt.NDArray[np.uint32], bits: int) -> npt.NDArray[np.uint32]:
    """A sum known mod 2^``bits`` as the uint32 two's complement of its true value.

    Devices send the low ``bits`` (``wire_bits``) of each masked value, so the
    unmasked sum is right mod 2^bits only: its values are sign-extended from
    ``bits`` (they are signed and fit, see :attr:`FixedPoint.wire_bits`) and the
    weight, last, is taken mod 2^bits (it is positive and fits).
    """
    if bits >= 32:
        return total
    out = total & np.uint32((1 << bits) - 1)
    shift = np.uint32(32 - bits)
    out[:-1] = (np.left_shift(out[:-1], shift).view(np.int32) >> np.int32(32 - bits)).view(np.uint32)
    return out


def open_secure_round(
    *, round_id: int, attempt: int, cohort: Sequence[str], num_examples: Mapping[str, int], params: Params,
    now: float, k: int | None, threshold: int | None, dropout_rate: float | None, clip: float,
    bits: int | None, max_weight: int | None, weighted: bool, phases_s: tuple[float, float, float],
    deadline_s: float, poll_s: float, wake: Callable[[], None],
    distributed: PrivacySession | None = None, min_contributors: int = 0,
) -> SecureRound:
    """The secure round of a new attempt: SecAgg+ setup, grid and deadlines for ``cohort``.

    ``num_examples`` holds the cohort's example counts from their check-ins:
    without ``max_weight``, the largest is the grid's weight bound (a device
    that reports more when it uploads encodes it capped there).

    ``distributed``: the run's distributed-DP session. Its plan fixes the
    grid's bits (room for the noise) and every update weighs 1; each device's
    noise share is sized so that ``m = max(threshold, min(min_contributors, n))``
    shares add up to the whole noise, and ``m`` becomes the setup's
    ``min_survivors``: the coordinator abandons, and honest devices refuse to
    unmask, a sum of fewer (it would carry less noise than the accountant charges).

    Raises:
        ConfigError: a cohort below 3, or a grid that could wrap (the config checks forbid both).
    """
    names = tuple(sorted(cohort))
    n = len(names)
    k_eff, t = secagg_parameters(n, k=k, threshold=threshold, dropout_rate=dropout_rate)
    if not weighted:
        weight_bound = 1
    elif max_weight is not None:
        weight_bound = max_weight
    else:  # the cohort's largest, bounded so that n of them cannot wrap the weight sum
        weight_bound = max(1, min(max((num_examples.get(d, 1) for d in names), default=1), _UINT32_MAX // n))
    need = 0
    if distributed is None or distributed.distributed is None:
        grid = FixedPoint(clip=clip, bits=bits if bits is not None else min(max_bits(n), _DEFAULT_BITS_CAP),
                          max_weight=weight_bound, cohort_size=n)
    else:
        need = max(t, min(min_contributors, n))
        grid = FixedPoint(clip=min(clip, distributed.clip_norm), bits=distributed.distributed.bits,
                          max_weight=1, cohort_size=n, noise_stddev=distributed.noise_share_stddev(need))
    # A fresh 256-bit seed from the OS for every attempt: the neighbour ring, and (with the
    # setup id) the salt of every derived key, are never those of another attempt.
    setup = RoundSetup(secagg_setup_id(round_id, attempt), names, k_eff, t, os.urandom(32),
                       P.num_values(params) + 1, min_survivors=need)
    advertise_s, share_s, unmask_s = phases_s
    times = PhaseTimes(opened_at=now, advertise_at=now + advertise_s, share_s=share_s,
                       upload_at=now + deadline_s, unmask_s=unmask_s)
    logger.info("round %d attempt %d: secure aggregation of %d devices, k %d, threshold %d, %d-bit grid "
                "(%d bits sent per value)", round_id, attempt, n, k_eff, t, grid.bits, grid.wire_bits)
    return SecureRound(setup=setup, grid=grid, weighted=weighted, times=times, poll_s=poll_s,
                       round_id=round_id, attempt=attempt, wake=wake)

"""A device's side of secure aggregation: one round attempt's SecAgg+ phases over the coordinator's API.

The agent loop imports this module only when a train plan asks for secure
aggregation, so the X25519, HKDF and AES code of ``cryptography`` loads only
then and an idle agent's footprint does not grow. One :class:`SecureSession`
per invitation, in order (docs/secagg.md)::

    exchange_keys()   POST keys,   poll GET keys (the neighbours' public keys),
                      POST shares, poll GET shares (the shares addressed here)
    ... the loop evaluates and trains ...
    upload(delta)     encode on the round's grid (encode_for_secagg), mask, POST masked
    unmask()          poll GET unmask (survivors, dropped), POST the shares it asks for

A phase's result is long-polled (the coordinator holds the request until
the phase closes, up to ``long_poll_s``) and asked again after ``poll_s``
until then, never past the phase's deadline; a network error is retried with
exponential backoff and full jitter until then. A refusal (a 4xx) or a
message the :class:`~fedge.secagg.protocol.SecAggClient` refuses (a
directory that alters this device's keys, shares that fail authentication,
an unmask request that names a device both survivor and dropped) ends the
round for this device: it raises, and the loop logs it and checks in again.

Secrets: the two private keys, the self-mask seed and the shares come from
``os.urandom``, live only in this object (which the round drops when it
ends), are never logged and never written to disk. Every attempt draws new
ones, so nothing is reused across attempts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from fedge import params as P
from fedge.agent.client import CoordinatorClient, RefusalError
from fedge.encoding.fixedpoint import FixedPoint, pack
from fedge.errors import ConfigError, ProtocolError, TransportError
from fedge.params import Params
from fedge.secagg.protocol import AdvertiseKeys, RoundSetup, SecAggClient, UnmaskRequest
from fedge.wire import (
    SecAggKeys,
    SecAggPoll,
    SecAggShares,
    SecAggUnmaskShares,
    TrainPlan,
    encode_masked,
    secagg_setup_id,
)

__all__ = ["SecureSession", "SessionStopped", "encode_for_secagg"]

logger = logging.getLogger(__name__)

_R = TypeVar("_R", bound=SecAggPoll)
# Beyond a phase's deadline the coordinator closes it within one turn of its driver (about 1 s);
# past this slack a phase that never answers is given up.
_GRACE_S = 5.0
_MIN_POLL_S = 0.05


class SessionStopped(Exception):  # noqa: N818 - a signal to the loop, not an error
    """The agent is stopping: the session ends, nothing more is sent."""


def encode_for_secagg(
    delta: Params, *, weight: int, grid: FixedPoint, rng: np.random.Generator, clip_norm: float | None = None,
) -> npt.NDArray[np.uint32]:
    """A device's update as integers on the round's shared grid, its weight appended.

    Without a noise share (``grid.noise_stddev == 0``): clip every value to
    ``[-clip, clip]``, scale by ``weight / max_weight``, round stochastically
    (unbiased) and write two's complement uint32 (:meth:`FixedPoint.encode`).
    With one (distributed DP): :func:`~fedge.privacy.distributed.privatize_on_grid`,
    the simulator's own device step: clip to L2 norm ``clip_norm``, round onto
    the grid, add this device's noise share, weight 1. This is the one place a
    device turns its update into what is masked. ``rng`` must then be this
    device's secret randomness (OS-seeded): the noise protects only if the
    coordinator cannot predict it.

    Raises:
        ConfigError: ``weight`` outside ``1..max_weight``, non-finite values,
            or a noise share without a clip norm or with a weighted grid.
    """
    if grid.noise_stddev == 0:
        return grid.encode(P.flatten(delta, np.float64), weight, rng)
    from fedge.privacy.distributed import privatize_on_grid

    if clip_norm is None:
        raise ConfigError("distributed DP needs the plan's clip_norm: noise on an unbounded update "
                          "protects nothing")
    try:
        return privatize_on_grid(P.flatten(delta, np.float64), clip_norm=clip_norm, grid=grid, rng=rng)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class SecureSession:
    """One device's secure-aggregation steps for one round attempt.

    Args:
        client: the coordinator's API for this device.
        plan: the invitation; its ``secagg`` holds the setup, the grid and the deadlines.
        device_id: this device (it must be in the plan's cohort).
        received_at: when the plan arrived, on ``clock`` (the deadlines count from then).
        clock: a monotonic clock in seconds.
        sleep: waits, returning early once the agent stops.
        stopping: whether the agent is stopping.
        backoff: the delay before retry ``n`` after ``n`` network errors in a row.
        long_poll_s: how long the coordinator may hold a request for a phase's result
            (0: answer at once); below the request timeout.

    Raises (from the constructor):
        ProtocolError: ``bad_plan`` (a setup or grid no honest coordinator
            sends), ``not_invited`` (this device is not in the cohort).
    """

    def __init__(
        self, client: CoordinatorClient, plan: TrainPlan, device_id: str, *, received_at: float,
        clock: Callable[[], float], sleep: Callable[[float], object], stopping: Callable[[], bool],
        backoff: Callable[[int], float], long_poll_s: float = 0.0,
    ) -> None:
        sa = plan.secagg
        if sa is None:
            raise ProtocolError("bad_plan", "the train plan holds no secure-aggregation setup")
        try:
            setup = RoundSetup(secagg_setup_id(plan.round, plan.attempt), tuple(sa.cohort), sa.k,
                               sa.threshold, sa.graph_seed, sa.vector_length, min_survivors=sa.min_survivors)
            self.grid = FixedPoint(clip=sa.clip, bits=sa.bits, max_weight=sa.max_weight,
                                   cohort_size=len(sa.cohort), noise_stddev=sa.noise_stddev)
        except ConfigError as e:
            raise ProtocolError("bad_plan", f"the secure-aggregation setup is unusable: {e}") from None
        if self.grid.wire_bits != sa.wire_bits:
            raise ProtocolError("bad_plan", f"the plan sends {sa.wire_bits} bits per value; the sum of "
                                f"{len(sa.cohort)} values of {sa.bits} bits needs {self.grid.wire_bits}")
        self._plan = plan
        self._client = client
        self._clock, self._sleep, self._stopping = clock, sleep, stopping
        self._backoff = backoff
        self._long_poll_s = max(0.0, long_poll_s)
        self._poll_s = max(_MIN_POLL_S, sa.poll_s)
        self._advertise_at = received_at + sa.advertise_deadline_s
        self._share_at = received_at + sa.share_deadline_s
        self._upload_at = received_at + plan.deadline_s
        self._unmask_at = received_at + sa.unmask_deadline_s
        self.weighted = sa.weighted
        # The device's secrets: drawn from the OS for this attempt alone, kept in memory only.
        self._secagg = SecAggClient(setup, device_id, random_bytes=os.urandom)

    # ------------------------------------------------------------ the phases

    def exchange_keys(self) -> None:
        """Phases 0 and 1: advertise keys, share the secrets with the neighbours, take theirs.

        Raises:
            RefusalError, ProtocolError, TransportError: the round ends for this device.
            SessionStopped: the agent is stopping.
        """
        plan = self._plan
        mine = self._secagg.advertise_keys()
        keys = SecAggKeys(round=plan.round, attempt=plan.attempt, c_pk=mine.c_pk, s_pk=mine.s_pk)
        self._send(lambda: self._client.send_secagg_keys(keys), self._advertise_at)
        directory = self._poll(lambda w: self._client.fetch_secagg_keys(plan.round, plan.attempt, wait_s=w),
                               self._advertise_at, "the key directory")
        shares = self._secagg.share_keys(
            {name: AdvertiseKeys(c_pk=k.c_pk, s_pk=k.s_pk) for name, k in directory.keys.items()})
        message = SecAggShares(round=plan.round, attempt=plan.attempt, shares=dict(shares.ciphertexts))
        self._send(lambda: self._client.send_secagg_shares(message), self._share_at)
        inbox = self._poll(lambda w: self._client.fetch_secagg_shares(plan.round, plan.attempt, wait_s=w),
                           self._share_at, "the shares")
        self._secagg.receive_shares(inbox.shares)
        logger.info("round %d attempt %d: secure aggregation keys exchanged with %d neighbours",
                    plan.round, plan.attempt, len(inbox.shares))

    def weight(self, num_examples: int) -> int:
        """The weight this device encodes: its example count (capped at the grid's bound), or 1."""
        if not self.weighted:
            return 1
        if num_examples > self.grid.max_weight:
            logger.warning("round %d: %d examples, more than the round's weight bound %d: the update "
                           "counts as %d", self._plan.round, num_examples, self.grid.max_weight,
                           self.grid.max_weight)
        return max(1, min(int(num_examples), self.grid.max_weight))

    def upload(self, delta: Params, *, num_examples: int, train_s: float, rng: np.random.Generator) -> int:
        """Phase 2: encode ``delta`` on the grid, mask it and upload it; returns the bytes sent.

        ``rng`` drives the stochastic rounding; with a distributed-DP noise share
        the rounding and the noise are drawn from the OS's entropy instead.

        Raises:
            RefusalError, ProtocolError, TransportError: the round ends for this device.
            SessionStopped: the agent is stopping.
        """
        plan = self._plan
        if self.grid.noise_stddev > 0:
            from fedge.privacy.mechanisms import noise_generator

            rng = noise_generator(None)  # the noise share and its rounding: the OS's entropy alone
        try:
            vector = encode_for_secagg(delta, weight=self.weight(num_examples), grid=self.grid, rng=rng,
                                       clip_norm=plan.clip_norm)
        except ConfigError as e:
            raise ProtocolError("bad_plan", f"the update does not fit the round's grid: {e}") from None
        masked = self._secagg.masked_input(vector).vector
        body = encode_masked(pack(masked, self.grid.wire_bits), round=plan.round, attempt=plan.attempt,
                             length=int(masked.size), bits=self.grid.wire_bits,
                             train_s=train_s if math.isfinite(train_s) and train_s >= 0 else 0.0)
        self._send(lambda: self._client.send_masked(plan.round, body), self._upload_at)
        return len(body)

    def unmask(self) -> int:
        """Phase 3: answer the unmask request (never both secrets of one device); returns the shares sent.

        Raises:
            RefusalError, ProtocolError, TransportError: the round ends for this device
                (``both_shares``: the request named a device both survivor and dropped).
            SessionStopped: the agent is stopping.
        """
        plan = self._plan
        request = self._poll(lambda w: self._client.fetch_unmask_request(plan.round, plan.attempt, wait_s=w),
                             self._unmask_at, "the unmask request")
        shares = self._secagg.unmask(UnmaskRequest(tuple(request.survivors), tuple(request.dropped)))
        message = SecAggUnmaskShares(round=plan.round, attempt=plan.attempt,
                                     self_shares=dict(shares.self_shares), key_shares=dict(shares.key_shares))
        self._send(lambda: self._client.send_unmask_shares(message), self._unmask_at, last=True)
        return len(shares.self_shares) + len(shares.key_shares)

    # ------------------------------------------------------------ transport

    def _pause(self, seconds: float) -> None:
        self._sleep(max(0.0, seconds))
        if self._stopping():
            raise SessionStopped

    def _retry(self, failures: int, error: TransportError, until: float) -> None:
        """Back off after a network error, or give up (raise it) once ``until`` has passed."""
        now = self._clock()
        if now >= until:
            raise error
        delay = self._backoff(failures)
        logger.debug("secure aggregation: %s; retrying in %.1f s", error, delay)
        self._pause(min(delay, until - now))

    def _send(self, send: Callable[[], object], deadline: float, *, last: bool = False) -> None:
        """POST a phase's message; after a network error, again until the deadline.

        A retry refused as ``duplicate``, or as ``out_of_phase`` (the phase closed
        meanwhile), may mean an earlier try arrived and its answer was lost: the
        session goes on, and the next phase's result says whether it counted (a
        device that missed the phase is refused there). After the ``last``
        message a round that has ended (``closed``) leaves nothing more to do.
        """
        settled = ("duplicate", "out_of_phase", "closed") if last else ("duplicate", "out_of_phase")
        failures = 0
        while True:
            if self._stopping():
                raise SessionStopped
            try:
                send()
                return
            except TransportError as e:
                self._retry(failures, e, deadline + _GRACE_S)
                failures += 1
            except RefusalError as e:
                if failures and e.reason in settled:
                    logger.info("round %d: a retried message was refused as %s: an earlier try arrived, "
                                "or the phase is over", self._plan.round, e.reason)
                    return
                raise

    def _poll(self, fetch: Callable[[float], _R], deadline: float, what: str) -> _R:
        """A phase's result: long-polled, and asked again after ``retry_s``, until the phase closed."""
        failures = 0
        give_up = deadline + max(_GRACE_S, 4 * self._poll_s)
        while True:
            if self._stopping():
                raise SessionStopped
            try:
                reply = fetch(min(self._long_poll_s, max(0.0, give_up - self._clock())))
            except TransportError as e:
                self._retry(failures, e, give_up)
                failures += 1
                continue
            failures = 0
            if reply.ready:
                return reply
            now = self._clock()
            if now >= give_up:
                raise ProtocolError("secagg_timeout", f"{what} was not ready {now - deadline:.1f} s after "
                                    "its phase's deadline")
            self._pause(min(max(_MIN_POLL_S, reply.retry_s), give_up - now))

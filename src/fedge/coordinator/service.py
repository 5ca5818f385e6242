"""The coordinator's round driver: the round logic of :mod:`fedge.rounds` over the network.

:class:`Coordinator` holds the live state (devices seen, the open round, its
streaming accumulator) and answers the protocol's requests; the FastAPI app
in :mod:`fedge.coordinator.app` only translates HTTP to these calls. All
methods run on the server's event loop thread, so the state needs no lock;
the slow steps (decoding an upload, writing a checkpoint, central
evaluation) run in worker threads and only touch values they were handed.

Rounds, as in the simulator: select a cohort from the devices that checked
in recently (inviting ``cohort_size * over_selection`` of them), accept each
invited device's update once and only before the deadline, close as soon as
``cohort_size`` updates arrived or at the deadline, and then either apply the
strategy and checkpoint (enough updates) or abandon the attempt and retry the
same round with a fresh cohort. With ``[secagg]`` a round's updates arrive
masked instead, through the phases of :class:`~fedge.coordinator.secagg.SecureRound`,
and the strategy is applied to their unmasked sum in the same way. The store is written before any reply that
depends on it, so a coordinator killed at any instant restarts from the last
complete round (see :mod:`fedge.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge import params as P
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.secagg import SecureRound, open_secure_round
from fedge.data.dataset import Dataset, DataSpec
from fedge.data.files import load_file
from fedge.encoding.fixedpoint import unpack
from fedge.errors import ConfigError, PrivacyBudgetError, ProtocolError, RoundError, TaskError
from fedge.params import ParamsSpec
from fedge.privacy.distributed import DistributedGrid
from fedge.privacy.mechanisms import DevicePrivacy, clip_by_l2
from fedge.privacy.session import LedgerEntry, PrivacySession
from fedge.rounds import Round, RoundState, select_cohort, select_within_deadline
from fedge.store import Store
from fedge.strategies import ServerState, Strategy, build_strategy
from fedge.strategies.base import Accumulator
from fedge.tasks import load_task
from fedge.tasks.base import Task
from fedge.wire import (
    REFUSALS,
    AbortReport,
    CheckIn,
    CheckInReply,
    EncodingInfo,
    EvalReport,
    EventBatch,
    EventsAck,
    MaskedUpload,
    TaskInfo,
    TrainPlan,
    UpdateAck,
    decode_masked,
    decode_params,
    decode_update,
    encode_params,
    payload_etag,
)

__all__ = ["Coordinator"]

logger = logging.getLogger(__name__)

# Purposes of the coordinator's generator streams (as in the simulator).
_INIT, _SELECT = 1, 2


_STORE_SEEN_S = 60.0
# Device events: each device may send this many a minute on average, in bursts of EVENTS_BURST.
EVENTS_PER_MINUTE = 120
EVENTS_BURST = 200


@dataclass
class _Device:
    last_seen: float
    num_examples: int
    ready: bool
    profile: dict[str, str | int | float | bool]
    stored_at: float


@dataclass
class _OpenRound:
    """The round in flight: the state machine plus what streams into it."""

    round: Round
    attempt: int
    target: int
    opened_at: float
    accumulator: Accumulator
    payload: bytes
    etag: str
    train_loss: list[tuple[float, float]] = field(default_factory=list)
    train_s: float | None = None  # the slowest reported local training time
    evaluated: set[str] = field(default_factory=set)
    aborted: dict[str, tuple[str, ...]] = field(default_factory=dict)  # device -> its reasons
    # Round profiling: the coordinator's own work by phase (seconds), and when each device
    # first fetched the params (for the download phase and each device's upload time).
    phases: dict[str, float] = field(default_factory=dict)
    fetched_at: dict[str, float] = field(default_factory=dict)
    upload_s: list[float] = field(default_factory=list)
    closing: bool = False
    # Bytes per device: update bodies received, params payloads sent.
    bytes_in: dict[str, int] = field(default_factory=dict)
    bytes_out: dict[str, int] = field(default_factory=dict)
    clip_norm: float | None = None  # central DP: the bound every update is clipped to on receipt
    local: DevicePrivacy | None = None  # local DP: what each device does to its update before upload
    unclipped: int = 0  # central DP: updates already within the bound (adaptive clipping's count)
    secagg: SecureRound | None = None  # secure aggregation: the round's SecAgg+ phases

    @property
    def settled(self) -> bool:
        """Every invited device has either reported or said it stopped: no need to wait longer."""
        return len(self.round.reported) + len(self.aborted) >= len(self.round.cohort)


class Coordinator:
    """Runs the configured rounds for the devices that check in.

    Building it opens (or resumes) the store: an open round left by a crash
    is marked interrupted and the next round is the one after the last
    complete one, from its checkpoint.

    Raises (from the constructor):
        ConfigError: an unknown task or strategy, an unreadable evaluation
            file, or a data directory that holds a run of another task.
    """

    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.eval_data: Dataset | None = load_file(config.eval_data) if config.eval_data else None
        self.spec = _spec_of(config, self.eval_data)
        self.task: Task = load_task(config.task, self.spec)
        options = dict(config.strategy_options)
        if config.strategy == "fedprox" and config.mu is not None:
            options["mu"] = config.mu
        self.strategy: Strategy = build_strategy(config.strategy, options)
        self.mu = config.mu if config.mu is not None else self.strategy.device_mu
        self.encoding = config.encoding_pipeline()
        self.encoding_info = EncodingInfo(
            compress=config.compress, bucket_size=config.compress_bucket, shared_range=config.compress_range
        )
        self.task_info = TaskInfo(
            name=config.task, num_features=self.spec.num_features, num_classes=self.spec.num_classes
        )
        self.privacy = _privacy_of(config, self.strategy, self._distributed_grid())
        #: Why no further round runs (the privacy budget), or None.
        self.stopped: str | None = None
        self.store = Store(config.data_dir)
        try:
            self._resume()
        except BaseException:
            self.store.close()
            raise
        self.devices: dict[str, _Device] = {}
        self.open: _OpenRound | None = None
        self.refusals: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self._wake = asyncio.Event()
        self._last_dropped: frozenset[str] = frozenset()
        # For deadline-aware selection: each device's last round trip, and its last invitation.
        self._round_trip_s: dict[str, float] = {}
        self._event_buckets: dict[str, list[float]] = {}  # device -> [tokens, last refill]
        self._last_invited: dict[str, int] = {}
        self._jitter = random.Random(config.seed)
        self._warm_up()

    def _warm_up(self) -> None:
        """Run the hot path once before serving, so its lazy imports happen now.

        The first update would otherwise import zstd and SciPy's BLAS on the
        event loop (about 150 ms during which no check-in is answered).
        """
        payload = encode_params(self.state.params, {"fedge.kind": "params"})
        params, _ = decode_params(payload, spec=self.params_spec, max_bytes=len(payload) + (1 << 20))
        self.strategy.accumulator(self.state.params).add(P.zeros_like(params), 1.0)

    def _resume(self) -> None:
        fingerprint = json.dumps(
            {
                "task": self.config.task,
                "num_features": self.spec.num_features,
                "num_classes": self.spec.num_classes,
                "strategy": self.config.strategy,
            }
        )
        self.store.check_meta("run", fingerprint)
        interrupted = self.store.interrupt_open_rounds(at=self._clock())
        for r, a in interrupted:
            logger.warning(
                "round %d attempt %d was in flight when the coordinator stopped; it restarts", r, a
            )
        self._resume_privacy()
        done = self.store.last_complete_round()
        if done:
            self.state = self.store.load_checkpoint(done)
            P.check_same_structure(self.state.params, self._init_params())
            logger.info("resuming after round %d from its checkpoint", done)
        else:
            self.state = self.strategy.init(self._init_params())
        self.params_spec = ParamsSpec.of(self.state.params)

    def _resume_privacy(self) -> None:
        """Take back the privacy ledger, and refuse at once if the budget is already spent."""
        ledger = self.store.privacy_ledger()
        if self.privacy is None:
            if ledger:
                raise ConfigError(
                    f"{self.config.data_dir} holds a privacy ledger of {len(ledger)} rounds: this run "
                    "trained under differential privacy and cannot go on without it ([privacy] table)"
                )
            return
        self.privacy.restore(ledger)
        if ledger:
            logger.info("privacy ledger: %d rounds, epsilon %.4g at delta %g",
                        len(ledger), self.privacy.epsilon, self.privacy.config.delta)
        self._check_budget()

    def _check_budget(self) -> bool:
        """False (and :attr:`stopped` set) if the next round would exceed the privacy budget."""
        if self.privacy is None or self.stopped is not None:
            return self.stopped is None
        try:
            self.privacy.check_budget()
        except PrivacyBudgetError as e:
            self.stopped = str(e)
            logger.error("%s", e)
            return False
        return True

    def _distributed_grid(self) -> DistributedGrid | None:
        """What fixes the secure-aggregation grid under distributed DP (else ``None``).

        The grid's range is the smaller of ``[secagg] clip`` and the DP clip norm
        (no coordinate of an update clipped to L2 norm C exceeds C), and its bits
        the most that leave room, with every device of the largest cohort a round
        may invite, for the noise of every share (docs/privacy.md, "Distributed DP").
        """
        cfg, settings = self.config, self.config.privacy
        if settings is None or settings.mode != "distributed":
            return None
        assert not isinstance(settings.clip_norm, str)  # adaptive clipping is refused with [secagg]
        return DistributedGrid(value_range=min(cfg.secagg_clip_value, float(settings.clip_norm)),
                               dim=P.num_values(self._init_params()), max_cohort=cfg.invite_count,
                               bits=cfg.secagg_bits)

    def _init_params(self) -> P.Params:
        # Seeded, so a coordinator that dies before round 1 completes starts
        # again from the same model.
        try:
            params = self.task.init_params(np.random.default_rng([self.config.seed, _INIT, 0]))
        except Exception as e:
            raise TaskError(f"task init_params failed: {type(e).__name__}: {e}") from e
        P.check_finite(params, what="initial params")
        return {k: np.asarray(v) for k, v in params.items()}

    # ------------------------------------------------------------ requests

    @property
    def done(self) -> bool:
        return self.state.round >= self.config.rounds or self.stopped is not None

    def refuse(self, error: ProtocolError, device_id: str | None, round_id: int | None) -> None:
        """Count and record a refusal (the app sends the error back)."""
        self.refusals[error.reason] = self.refusals.get(error.reason, 0) + 1
        try:
            self.store.record_refusal(
                code=error.reason, device_id=device_id, round=round_id, at=self._clock()
            )
        except Exception:  # a refusal must never turn into a server error
            logger.exception("could not record a refusal")
        logger.info("refused %s from device %s: %s", error.reason, device_id, error.detail)

    def check_in(self, device_id: str, msg: CheckIn) -> CheckInReply:
        """Note the device as seen, and tell it to wait, train or stop."""
        now = self._clock()
        before = self.devices.get(device_id)
        self.devices[device_id] = _Device(
            now,
            msg.num_examples,
            msg.ready and msg.num_examples > 0,
            msg.profile,
            before.stored_at if before else 0.0,
        )
        # The store learns of a device when it is new or changed, and otherwise
        # at most once a minute: a check-in is the hottest request there is.
        if (
            before is None
            or before.num_examples != msg.num_examples
            or before.profile != msg.profile
            or now - before.stored_at >= _STORE_SEEN_S
        ):
            self.store.upsert_device(device_id, now=now, num_examples=msg.num_examples, profile=msg.profile)
            self.devices[device_id].stored_at = now
        if before is None:
            logger.info("device %s checked in (%d examples)", device_id, msg.num_examples)
            self._wake.set()
        if self.done:
            return CheckInReply(action="done", task=self.task_info)
        rnd = self.open
        if (
            rnd is not None
            and not rnd.closing
            and device_id in rnd.round.cohort
            and (
                # A secure round takes only devices that join before its keys are exchanged.
                rnd.secagg.invites(device_id, now) if rnd.secagg is not None
                else device_id not in rnd.round.reported and now < rnd.round.deadline
            )
        ):
            # Central DP clips every update; under secure aggregation the coordinator sees
            # none, so the device clips its own (and a malicious device may not: docs/secagg.md).
            clip_norm = rnd.local.clip_norm if rnd.local is not None else (
                rnd.clip_norm if rnd.secagg is not None else None)
            plan = TrainPlan(
                round=rnd.round.round_id,
                attempt=rnd.attempt,
                params_etag=rnd.etag,
                deadline_s=max(0.0, rnd.round.deadline - now),
                local_epochs=self.config.local_epochs,
                batch_size=self.config.batch_size,
                lr=self.config.lr,
                mu=self.mu,
                evaluate=True,
                encoding=self.encoding_info,
                clip_norm=clip_norm,
                noise_stddev=0.0 if rnd.local is None else rnd.local.local_stddev,
                secagg=None if rnd.secagg is None else rnd.secagg.plan(now),
            )
            return CheckInReply(action="train", task=self.task_info, plan=plan)
        # Spread the next check-ins over +-25% of wait_s: devices that came
        # up together (a power cut, a rollout) drift apart instead of
        # arriving in lockstep every period.
        wait_s = self.config.wait_s * (0.75 + 0.5 * self._jitter.random())
        return CheckInReply(action="wait", wait_s=wait_s, task=self.task_info)

    def params_payload(self, round_id: int, device_id: str | None = None) -> tuple[bytes, str]:
        """The encoded params of the open round ``round_id`` and their ETag.

        Raises:
            ProtocolError: ``unknown_round`` unless ``round_id`` is open.
        """
        rnd = self.open
        if rnd is None or rnd.round.round_id != round_id:
            raise ProtocolError("unknown_round", f"round {round_id} is not open", REFUSALS["unknown_round"])
        if device_id is not None:
            rnd.fetched_at.setdefault(device_id, self._clock())
        return rnd.payload, rnd.etag

    def count_upload(self, device_id: str, round_id: int, size: int) -> None:
        """Count ``size`` bytes ``device_id`` sent to round ``round_id`` (a secure round's key messages)."""
        rnd = self.open
        if rnd is not None and rnd.round.round_id == round_id and device_id in rnd.round.cohort:
            rnd.bytes_in[device_id] = rnd.bytes_in.get(device_id, 0) + size

    def count_download(self, device_id: str, round_id: int, size: int) -> None:
        """Count ``size`` bytes of params sent to ``device_id`` for round ``round_id``."""
        rnd = self.open
        if rnd is not None and rnd.round.round_id == round_id:
            rnd.bytes_out[device_id] = rnd.bytes_out.get(device_id, 0) + size

    async def submit_update(self, device_id: str, round_id: int, body: bytes) -> UpdateAck:
        """Check, decode and accumulate one device's update.

        Raises:
            ProtocolError: any refusal of :data:`fedge.wire.REFUSALS`; the
                round and the process carry on.
        """
        rnd = self._round_for(device_id, round_id)
        t0 = time.perf_counter()
        # Counted before decoding: a refused body crossed the wire too.
        rnd.bytes_in[device_id] = rnd.bytes_in.get(device_id, 0) + len(body)
        if rnd.secagg is not None:  # never read: an update in the clear has no place in a secure round
            raise ProtocolError("out_of_phase", f"round {round_id} uses secure aggregation: updates go "
                                "masked to /secagg/masked", REFUSALS["out_of_phase"])
        update, digest = await asyncio.to_thread(self._decode, body)
        decode_s = time.perf_counter() - t0
        if update.round != round_id:
            raise ProtocolError(
                "bad_payload", f"the payload is for round {update.round}, sent to round {round_id}"
            )
        # The round may have moved on while the payload was being decoded.
        rnd = self._round_for(device_id, round_id)
        if update.attempt != rnd.attempt:
            raise ProtocolError(
                "closed", f"round {round_id} attempt {update.attempt} has ended", REFUSALS["closed"]
            )
        now = self._clock()
        try:
            rnd.round.accept(device_id, float(update.num_examples), now)
        except RoundError as e:
            raise ProtocolError(e.reason, e.detail, REFUSALS.get(e.reason, 409)) from None
        self._round_trip_s[device_id] = now - rnd.opened_at
        t0 = time.perf_counter()
        # Finite updates can overflow when summed; the new params are checked
        # for that when the round closes, so numpy need not warn here.
        with np.errstate(over="ignore", invalid="ignore"):
            if rnd.local is not None:
                # Local DP: clipped and noised on the device; weight 1, like central DP.
                rnd.accumulator.add(update.delta, 1.0)
            elif rnd.clip_norm is not None:
                # Central DP: the coordinator is trusted, so it clips on receipt;
                # every clipped update weighs 1 (docs/privacy.md, "Weights").
                clipped, norm = clip_by_l2(update.delta, rnd.clip_norm)
                rnd.unclipped += int(norm <= rnd.clip_norm)
                rnd.accumulator.add(clipped, 1.0)
            else:
                rnd.accumulator.add(update.delta, float(update.num_examples))
        _add_phase(rnd.phases, "decode", decode_s)
        _add_phase(rnd.phases, "aggregation", time.perf_counter() - t0)
        loss = update.metrics.get("train_loss")
        if loss is not None:
            rnd.train_loss.append((loss, float(update.num_examples)))
        took = update.metrics.get("train_s")
        if took is not None:
            rnd.train_s = max(took, rnd.train_s or 0.0)
            fetched = rnd.fetched_at.get(device_id)
            if fetched is not None:  # what is left of the device's time: evaluation, encoding, upload
                rnd.upload_s.append(max(0.0, now - fetched - took))
        self.store.record_update(
            round_id,
            rnd.attempt,
            device_id,
            digest=digest,
            size_bytes=len(body),
            num_examples=update.num_examples,
            received_at=now,
            metrics=update.metrics,
        )
        if len(rnd.round.reported) >= rnd.target:
            self._wake.set()
        return UpdateAck(round=round_id, attempt=rnd.attempt)

    def secure_round(self, device_id: str, round_id: int) -> SecureRound:
        """The secure round ``round_id`` for a request of ``device_id`` (the app calls its methods).

        Raises:
            ProtocolError: as for an update (``closed``, ``unknown_round``,
                ``not_invited``), or ``out_of_phase`` if the round is not secure.
        """
        rnd = self._round_for(device_id, round_id)
        if rnd.secagg is None:
            raise ProtocolError("out_of_phase", f"round {round_id} does not use secure aggregation",
                                REFUSALS["out_of_phase"])
        return rnd.secagg

    async def submit_masked(self, device_id: str, round_id: int, body: bytes) -> UpdateAck:
        """Check a device's masked vector and add it to the round's masked sum.

        Raises:
            ProtocolError: a refusal of :data:`fedge.wire.REFUSALS` (``wrong_length``,
                ``out_of_phase``, ``duplicate``, ``late``...); the round carries on.
        """
        secure = self.secure_round(device_id, round_id)
        rnd = self._round_for(device_id, round_id)
        rnd.bytes_in[device_id] = rnd.bytes_in.get(device_id, 0) + len(body)
        secure.accepts_upload(device_id, secure.attempt)  # out of phase: refused before decoding
        t0 = time.perf_counter()
        upload, vector = await asyncio.to_thread(
            _decode_masked, body, secure.setup.vector_length, secure.grid.wire_bits)
        decode_s = time.perf_counter() - t0
        if upload.round != round_id:
            raise ProtocolError(
                "bad_payload", f"the masked vector is for round {upload.round}, sent to round {round_id}"
            )
        if self.secure_round(device_id, round_id) is not secure:  # the round moved on meanwhile
            raise ProtocolError("closed", f"round {round_id} attempt {secure.attempt} has ended",
                                REFUSALS["closed"])
        now = self._clock()
        if now > rnd.round.deadline:
            raise ProtocolError("late", f"round {round_id}'s upload deadline has passed", REFUSALS["late"])
        t0 = time.perf_counter()
        secure.receive_masked(device_id, upload.attempt, vector)
        _add_phase(rnd.phases, "aggregation", time.perf_counter() - t0)
        _add_phase(rnd.phases, "decode", decode_s)
        try:
            rnd.round.accept(device_id, 1.0, now)  # the weight is inside the masked vector
        except RoundError as e:
            raise ProtocolError(e.reason, e.detail, REFUSALS.get(e.reason, 409)) from None
        self._round_trip_s[device_id] = now - rnd.opened_at
        rnd.train_s = max(upload.train_s, rnd.train_s or 0.0)
        # The device trains once it holds its shares, so its upload time counts from then.
        if secure.keys_closed_at is not None:
            rnd.upload_s.append(max(0.0, now - secure.keys_closed_at - upload.train_s))
        self.store.record_update(
            round_id, rnd.attempt, device_id, digest=hashlib.sha256(body).hexdigest(), size_bytes=len(body),
            num_examples=0,  # unknown: the example count is masked with the update
            received_at=now, metrics={"train_s": upload.train_s},
        )
        return UpdateAck(round=round_id, attempt=rnd.attempt)

    def submit_events(self, device_id: str, batch: EventBatch) -> EventsAck:
        """Store a device's events, within its rate: ``EVENTS_PER_MINUTE`` on average, bursts of
        ``EVENTS_BURST``. A batch over the rate is refused whole (429), so a device never floods
        the store; the agent keeps its events and sends them later."""
        now = self._clock()
        bucket = self._event_buckets.get(device_id)
        if bucket is None:
            bucket = self._event_buckets[device_id] = [float(EVENTS_BURST), now]
        tokens = min(float(EVENTS_BURST), bucket[0] + (now - bucket[1]) * EVENTS_PER_MINUTE / 60.0)
        bucket[1] = now
        if len(batch.events) > tokens:
            bucket[0] = tokens
            raise ProtocolError(
                "rate_limited",
                f"device {device_id} sent more than {EVENTS_PER_MINUTE} events a minute; send them later",
                REFUSALS["rate_limited"],
            )
        bucket[0] = tokens - len(batch.events)
        self.store.record_events(
            device_id, [(e.at, e.kind, e.level, e.message, e.fields) for e in batch.events], received_at=now
        )
        return EventsAck(stored=len(batch.events))

    def _report_round(self, device_id: str, round_id: int, report: EvalReport | AbortReport) -> _OpenRound:
        """The open round a device's JSON report is for; refused unless its round and attempt match."""
        rnd = self._round_for(device_id, round_id)
        if report.round != round_id:
            raise ProtocolError(
                "bad_request", f"the report is for round {report.round}, sent to round {round_id}"
            )
        if report.attempt != rnd.attempt:
            raise ProtocolError(
                "closed", f"round {round_id} attempt {report.attempt} has ended", REFUSALS["closed"]
            )
        return rnd

    def submit_eval(self, device_id: str, round_id: int, report: EvalReport) -> UpdateAck:
        """Record a device's evaluation of the round's params on its own data."""
        rnd = self._report_round(device_id, round_id, report)
        if device_id in rnd.evaluated:
            raise ProtocolError(
                "duplicate",
                f"device {device_id} already reported metrics to round {round_id}",
                REFUSALS["duplicate"],
            )
        rnd.evaluated.add(device_id)
        self.store.record_metrics(
            round_id,
            rnd.attempt,
            device_id,
            kind="eval",
            num_examples=report.num_examples,
            metrics=report.metrics,
            at=self._clock(),
        )
        return UpdateAck(round=round_id, attempt=rnd.attempt)

    def submit_abort(self, device_id: str, round_id: int, report: AbortReport) -> UpdateAck:
        """A device stopped training for the round (its policy, a limit): count it out now.

        The round closes as soon as every invited device has reported or
        stopped, instead of waiting for the deadline.
        """
        rnd = self._report_round(device_id, round_id, report)
        if device_id in rnd.round.reported or device_id in rnd.aborted:
            raise ProtocolError(
                "duplicate", f"device {device_id} already reported to round {round_id}", REFUSALS["duplicate"]
            )
        rnd.aborted[device_id] = tuple(report.reasons)
        logger.warning("round %d attempt %d: device %s stopped training: %s",
                       round_id, rnd.attempt, device_id, "; ".join(report.reasons))
        self.store.record_metrics(round_id, rnd.attempt, device_id, kind="abort", num_examples=0,
                                  metrics={}, at=self._clock())
        if rnd.settled:
            self._wake.set()
        return UpdateAck(round=round_id, attempt=rnd.attempt)

    def _round_for(self, device_id: str, round_id: int) -> _OpenRound:
        rnd = self.open
        current = self.state.round + 1
        if round_id < current or (rnd is not None and rnd.closing and round_id == rnd.round.round_id):
            raise ProtocolError("closed", f"round {round_id} has ended", REFUSALS["closed"])
        if rnd is None or rnd.round.round_id != round_id:
            raise ProtocolError("unknown_round", f"round {round_id} is not open", REFUSALS["unknown_round"])
        if device_id not in rnd.round.cohort:
            raise ProtocolError(
                "not_invited", f"device {device_id} is not in round {round_id}", REFUSALS["not_invited"]
            )
        return rnd

    def _decode(self, body: bytes) -> tuple[Any, str]:
        update = decode_update(
            body, spec=self.params_spec, max_bytes=self.config.max_body_bytes, encoding=self.encoding
        )
        return update, hashlib.sha256(body).hexdigest()

    # ------------------------------------------------------------ the driver

    async def run(self, on_done: Callable[[], None] | None = None) -> None:
        """Drive rounds until the configured count is complete (then call ``on_done``)."""
        while not self.done:
            self._wake.clear()
            rnd = self.open
            now = self._clock()
            if rnd is None:
                if self._open_round(now):
                    continue
                timeout = 0.5
            elif rnd.secagg is not None:
                if await rnd.secagg.advance(now, aborted=rnd.aborted.keys(), target=rnd.target,
                                            min_updates=rnd.round.min_updates):
                    await self._close_round(rnd)
                    continue
                timeout = min(1.0, max(0.0, rnd.secagg.next_deadline() - now))
            elif len(rnd.round.reported) >= rnd.target or rnd.settled or now >= rnd.round.deadline:
                await self._close_round(rnd)
                continue
            else:
                timeout = min(1.0, max(0.0, rnd.round.deadline - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        if self.stopped is not None:
            logger.error("training stopped after %d rounds: %s", self.state.round, self.stopped)
        else:
            logger.info("training complete: %d rounds", self.state.round)
        if on_done is not None:
            on_done()

    def clock(self) -> float:
        """The coordinator's clock (wall-clock seconds; a test's own clock in tests)."""
        return self._clock()

    def online(self, now: float) -> list[str]:
        """Devices that checked in recently (within three check-in periods, 10 s at least)."""
        horizon = now - max(3 * self.config.wait_s, 10.0)
        return sorted(d for d, s in self.devices.items() if s.last_seen >= horizon)

    def available(self, now: float) -> list[str]:
        """Devices that checked in recently, say they may train, and hold data."""
        horizon = now - max(3 * self.config.wait_s, 10.0)
        return sorted(d for d, s in self.devices.items() if s.ready and s.last_seen >= horizon)

    def estimate_round_s(self, device_id: str) -> float | None:
        """How long a round should take ``device_id``: its last measured round trip (invitation to
        update) if it has one, else the training time its capability profile predicts."""
        seen = self._round_trip_s.get(device_id)
        if seen is not None:
            return seen
        d = self.devices.get(device_id)
        rate = d.profile.get("examples_per_s") if d is not None else None
        if d is None or not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
            return None
        return self.config.local_epochs * d.num_examples / float(rate)

    def _select_within_deadline(self, pool: list[str], size: int, rng: np.random.Generator) -> list[str]:
        cfg = self.config
        estimates = {d: self.estimate_round_s(d) for d in pool}
        picked, too_slow = select_within_deadline(
            pool, estimate_s=estimates, deadline_s=cfg.deadline_s, size=size, rng=rng,
            last_round=self._last_invited, fairness=cfg.fairness,
        )
        cohort = list(picked)
        if too_slow:
            logger.info("%d devices are expected to miss the %.0f s deadline and are not invited",
                        len(too_slow), cfg.deadline_s)
        if len(cohort) < cfg.effective_min_updates and too_slow:
            # Better a round with slow devices than no round: the estimates may be pessimistic.
            fastest_first = sorted(too_slow, key=lambda d: estimates[d] or 0.0)
            cohort += fastest_first[: cfg.effective_min_updates - len(cohort)]
        return sorted(cohort)

    def _open_round(self, now: float) -> bool:
        cfg = self.config
        ready = self.available(now)
        if len(ready) < cfg.effective_min_devices:
            return False
        started = time.perf_counter()
        if not self._check_budget():
            return False
        # A retry prefers devices that did not just drop out, if enough remain.
        fresh = [d for d in ready if d not in self._last_dropped]
        pool = fresh if len(fresh) >= cfg.effective_min_updates else ready
        round_id = self.state.round + 1
        tried = sum(1 for row in self.store.rounds() if row.round == round_id)
        rng = np.random.default_rng([cfg.seed, _SELECT, round_id, tried])
        size = min(len(pool), cfg.invite_count)
        if cfg.selection == "deadline":
            cohort = self._select_within_deadline(pool, size, rng)
        else:
            picked = select_cohort(np.arange(len(pool)), rng=rng, cohort_size=size)
            cohort = [pool[i] for i in picked.tolist()]
        if cfg.secagg and len(cohort) < 3:  # the config makes it impossible; never risk it
            return False
        for d in cohort:
            self._last_invited[d] = round_id
        min_updates = min(cfg.effective_min_updates, len(cohort))
        deadline = now + cfg.deadline_s
        attempt = self.store.open_round(
            round_id, cohort=cohort, min_updates=min_updates, opened_at=now, deadline_at=deadline
        )
        payload = encode_params(self.state.params, {"fedge.kind": "params", "fedge.round": str(round_id)})
        self.open = _OpenRound(
            round=Round.open(round_id, cohort, min_updates=min_updates, deadline=deadline),
            attempt=attempt,
            target=min(cfg.cohort_size, len(cohort)),
            opened_at=now,
            accumulator=self.strategy.accumulator(self.state.params),
            payload=payload,
            etag=payload_etag(payload),
        )
        self.open.phases["selection"] = time.perf_counter() - started
        if self.privacy is not None:
            how = self.privacy.device_privacy()
            if self.privacy.config.mode == "local":
                self.open.local = how
            else:
                self.open.clip_norm = how.clip_norm
        if cfg.secagg:
            self.open.secagg = open_secure_round(
                round_id=round_id, attempt=attempt, cohort=cohort,
                num_examples={d: self.devices[d].num_examples for d in cohort}, params=self.state.params,
                now=now, k=cfg.secagg_k, threshold=cfg.secagg_threshold, dropout_rate=cfg.secagg_dropout_rate,
                clip=cfg.secagg_clip_value, bits=cfg.secagg_bits, max_weight=cfg.secagg_max_weight,
                # With DP every update is clipped and weighs 1 (docs/privacy.md, "Weights").
                weighted=self.privacy is None, phases_s=cfg.secagg_phases_s, deadline_s=cfg.deadline_s,
                poll_s=cfg.secagg_poll_value, wake=self._wake.set,
                distributed=self.privacy if self.privacy is not None and self.privacy.distributed else None,
                min_contributors=min_updates,
            )
        logger.info(
            "round %d attempt %d open: %d devices invited, %d needed, deadline %.0f s",
            round_id,
            attempt,
            len(cohort),
            min_updates,
            cfg.deadline_s,
        )
        return True

    async def _close_round(self, rnd: _OpenRound) -> None:
        rnd.closing = True
        now = self._clock()
        outcome = rnd.round.close()
        r, attempt = outcome.round_id, rnd.attempt
        reported = [str(d) for d in outcome.reported]
        dropped = [str(d) for d in outcome.dropped]
        metrics: dict[str, float] = {}
        evals = self.store.metrics(r, attempt, kind="eval")
        if evals:
            metrics.update(_weighted_eval(evals))
        if rnd.train_loss:
            total = sum(w for _, w in rnd.train_loss)
            metrics["train_loss"] = sum(v * w for v, w in rnd.train_loss) / total
        if rnd.train_s is not None:
            metrics["train_s"] = rnd.train_s
        metrics.update(_profile(rnd, now, self.config.local_epochs))
        metrics["bytes_up"] = float(sum(rnd.bytes_in.values()))
        metrics["bytes_down"] = float(sum(rnd.bytes_out.values()))
        self._record_traffic(rnd, now)
        secure = rnd.secagg
        if secure is not None:
            metrics.update(secure.metrics())
        state = None
        ledger: LedgerEntry | None = None
        # A secure round is complete only once unmasked: an abandoned one revealed nothing.
        if outcome.state is RoundState.COMPLETE and (secure is None or secure.total is not None):
            aggregate = rnd.accumulator.result() if secure is None else secure.aggregate(self.params_spec)
            if self.privacy is not None:
                aggregate = self.privacy.release(r, aggregate, unclipped=rnd.unclipped)
                ledger = self.privacy.charge(r)
                metrics["epsilon"] = ledger.epsilon
                metrics["clip_norm"] = ledger.clip_norm
            t0 = time.perf_counter()
            with np.errstate(over="ignore", invalid="ignore"):
                state = self.strategy.apply(self.state, aggregate)
            applied = time.perf_counter() - t0
            metrics["phase_aggregation_s"] = metrics.get("phase_aggregation_s", 0.0) + applied
            state = ServerState(params=state.params, opt_state=state.opt_state, round=r)
            try:
                # Finite updates can still overflow when summed; a model with
                # an infinity in it must never become the next round's params.
                P.check_finite(state.params, what=f"round {r}'s new params")
            except ValueError as e:
                logger.error("round %d attempt %d abandoned: %s", r, attempt, e)
                state = None
        if state is not None:
            if self.eval_data is not None and (r % self.config.eval_every == 0 or r == self.config.rounds):
                t0 = time.perf_counter()
                metrics.update(await asyncio.to_thread(self._evaluate, state.params))
                metrics["phase_evaluation_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.to_thread(
                self.store.complete_round,
                r,
                attempt,
                state,
                closed_at=now,
                reported=reported,
                dropped=dropped,
                metrics=metrics,
                privacy=ledger,
            )
            self.store.set_round_metric(r, attempt, "phase_store_s", time.perf_counter() - t0)
            self.state = state
            self._last_dropped = frozenset()
            logger.info(
                "round %d complete: %d of %d reported%s",
                r,
                len(reported),
                len(rnd.round.cohort),
                f", accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else "",
            )
        else:
            self.store.abandon_round(r, attempt, closed_at=now, reported=reported, dropped=dropped,
                                     metrics=None if secure is None else metrics)
            self._last_dropped = frozenset(dropped)
            if outcome.state is not RoundState.COMPLETE and secure is None:
                logger.warning(
                    "round %d attempt %d abandoned: %d of the %d needed reported; "
                    "retrying with a fresh cohort",
                    r,
                    attempt,
                    len(reported),
                    rnd.round.min_updates,
                )
        self.open = None

    def _record_traffic(self, rnd: _OpenRound, now: float) -> None:
        """One metrics row per attempt: bytes up and down of every device (``up:ID``, ``down:ID``)."""
        traffic = {f"up:{d}": float(n) for d, n in sorted(rnd.bytes_in.items())}
        traffic.update({f"down:{d}": float(n) for d, n in sorted(rnd.bytes_out.items())})
        if traffic:
            self.store.record_metrics(
                rnd.round.round_id, rnd.attempt, None, kind="traffic", num_examples=0, metrics=traffic, at=now
            )

    def _evaluate(self, params: P.Params) -> dict[str, float]:
        assert self.eval_data is not None
        try:
            return {str(k): float(v) for k, v in self.task.evaluate(params, self.eval_data).items()}
        except Exception as e:
            logger.error("central evaluation failed: %s: %s", type(e).__name__, e)
            return {}

    def history(self) -> list[dict[str, Any]]:
        """Every ended round attempt as ``/v1/status`` shows it."""
        return [_row_json(row) for row in self.store.rounds() if row.state != "open"]

    def status(self, *, history: bool = True) -> dict[str, Any]:
        """Where training stands, for ``/v1/status`` and the demo's progress line."""
        rnd = self.open
        return {
            "state": "done" if self.done else ("running" if rnd is not None else "waiting"),
            "rounds_complete": self.state.round,
            "rounds": self.config.rounds,
            "open": None
            if rnd is None
            else {
                "round": rnd.round.round_id,
                "attempt": rnd.attempt,
                "invited": len(rnd.round.cohort),
                "reported": len(rnd.round.reported),
                "target": rnd.target,
                **({} if rnd.secagg is None else {"secagg": rnd.secagg.status()}),
            },
            "devices": len(self.devices),
            "available": len(self.available(self._clock())),
            "history": self.history() if history else None,
            "refusals": {k: v for k, v in self.refusals.items() if v},
            "privacy": None if self.privacy is None else {
                "epsilon": self.privacy.epsilon, "delta": self.privacy.config.delta,
                "budget": self.privacy.config.effective_budget, "stopped": self.stopped,
            },
        }

    def close(self) -> None:
        self.store.close()


def _decode_masked(body: bytes, length: int, bits: int) -> tuple[MaskedUpload, np.ndarray]:
    """A masked-vector frame and its values (uint32, low ``bits`` of each), checked (worker thread)."""
    upload = decode_masked(body, length=length, bits=bits)
    return upload, unpack(upload.packed, bits, length)


def _privacy_of(
    config: CoordinatorConfig, strategy: Strategy, grid: DistributedGrid | None = None
) -> PrivacySession | None:
    """DP for a federation: noise from the OS entropy, and no amplification claimed.

    Cohorts are drawn from the devices that happen to be available, so no
    device's chance of being picked is known, and a device that becomes
    available can push another out of a full cohort: the accountant claims
    no amplification and a sensitivity of twice the clip (``availability``
    sampling), which holds whatever availability does (docs/privacy.md,
    "Sampling honesty").
    """
    settings = config.privacy
    if settings is None:
        return None
    if getattr(strategy, "needs_every_update", False):
        raise ConfigError(f"[privacy] needs a strategy that sums updates; {config.strategy!r} keeps each one")
    return PrivacySession(settings, sampling="availability", expected_reports=float(config.cohort_size),
                          planned_rounds=config.rounds, seed=None, grid=grid)


def _weighted_eval(rows: list[dict[str, object]]) -> dict[str, float]:
    """Example-weighted means of the devices' evaluation metrics, as ``device_<name>``."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for row in rows:
        n = float(row["num_examples"])  # type: ignore[arg-type]
        for k, v in row["metrics"].items():  # type: ignore[attr-defined]
            sums[k] = sums.get(k, 0.0) + n * float(v)
            weights[k] = weights.get(k, 0.0) + n
    return {f"device_{k}": sums[k] / weights[k] for k in sums}


def _add_phase(phases: dict[str, float], name: str, seconds: float) -> None:
    phases[name] = phases.get(name, 0.0) + seconds


def _profile(rnd: _OpenRound, now: float, local_epochs: int) -> dict[str, float]:
    """The round's phase timings, as ``phase_NAME_s`` metrics (docs/observability.md).

    selection, decode, aggregation: the coordinator's own work; download: until the last
    invited device fetched the params; training: the slowest device's reported training
    time; upload: the most any device spent between training and its update arriving
    (local evaluation and encoding included).
    """
    out = {f"phase_{name}_s": seconds for name, seconds in rnd.phases.items()}
    if rnd.fetched_at:
        out["phase_download_s"] = max(rnd.fetched_at.values()) - rnd.opened_at
    if rnd.train_s is not None:
        out["phase_training_s"] = rnd.train_s
    if rnd.upload_s:
        out["phase_upload_s"] = max(rnd.upload_s)
    out["local_epochs"] = float(local_epochs)
    out["round_s"] = now - rnd.opened_at
    return out


def _row_json(row: Any) -> dict[str, Any]:
    return {
        "round": row.round,
        "attempt": row.attempt,
        "state": row.state,
        "invited": len(row.cohort),
        "reported": len(row.reported),
        "dropped": list(row.dropped),
        "duration_s": None if row.closed_at is None else round(row.closed_at - row.opened_at, 4),
        **row.metrics,
    }


def _spec_of(config: CoordinatorConfig, eval_data: Dataset | None) -> DataSpec:
    if eval_data is None:
        assert config.num_features is not None and config.num_classes is not None
        return DataSpec(config.num_features, config.num_classes)
    features = int(eval_data.x.shape[1])
    classes = int(eval_data.y.max()) + 1
    if config.num_features is not None and config.num_features != features:
        raise ConfigError(
            f"task.num_features is {config.num_features} but {config.eval_data} has {features} features"
        )
    if config.num_classes is not None:
        if classes > config.num_classes:
            raise ConfigError(
                f"{config.eval_data} has labels up to {classes - 1}, beyond task.num_classes "
                f"{config.num_classes}"
            )
        classes = config.num_classes
    return DataSpec(features, max(classes, 2))

"""The device agent's loop: check in, and when invited fetch, evaluate, train and upload.

One pass of the loop (DESIGN.md, "Round protocol")::

    check-in --wait--> sleep wait_s (+-10%) --> check-in
             --done--> exit 0
             --train-> GET params (ETag-cached) -> evaluate, POST metrics
                       -> train -> POST update -> check-in

Failures and what the agent does about them:

* **No answer** (connection refused or reset, DNS, timeout, 5xx): retry after
  an exponential backoff with full jitter (:func:`backoff_delay`). The count
  of failures in a row resets when a check-in answers "wait" or "done", or a
  round ends with an answer (accepted or refused). A restarted coordinator is
  found again this way, with no help.
* **A refusal** (4xx) of params, metrics or an update (``closed``, ``late``,
  ``not_invited``...): one warning line, then back to check-in; the refused
  upload is never retried, and a round attempt the coordinator refused is not
  trained again if it is offered again (the agent backs off instead of spinning).
* **A refused check-in** (``bad_version``, ``unknown_device``...): a
  configuration problem on one side or the other; logged as an error and
  retried with backoff, so an operator can fix the coordinator meanwhile.
* **Local data that does not fit the coordinator's task**: a
  :class:`~fedge.errors.ConfigError` out of :meth:`Agent.run` (exit 2).
* **Stop** (SIGTERM, SIGINT, :meth:`Agent.stop`): every sleep is an
  ``Event.wait`` and ends at once; a request in flight finishes (bounded by
  its timeout); training in progress finishes its call and its result is
  dropped, never uploaded.

Privacy: params, updates and anything derived from them are never logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import random
import signal
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from pydantic import ValidationError

from fedge import __version__
from fedge.agent.client import CoordinatorClient, RefusalError
from fedge.agent.config import AgentConfig
from fedge.agent.events import EventHandler, EventLog
from fedge.agent.monitor import Monitor, Readings
from fedge.agent.policy import Verdict, verdict
from fedge.agent.profile import ProfileCache
from fedge.agent.residual import load_residual, save_residual
from fedge.agent.state import RoundsToday, StateLock, resolve_device_id
from fedge.agent.textfile import write_textfile
from fedge.agent.traffic import WIRE_FILE, WireRecorder
from fedge.agent.trainer import Trainer, TrainingStopped, agent_overhead
from fedge.data.dataset import Dataset, DataSpec
from fedge.data.files import load_file
from fedge.encoding import EncodingConfig, Pipeline, build_pipeline
from fedge.errors import ConfigError, ProtocolError, TaskError, TransportError
from fedge.params import Params, ParamsSpec, check_finite, subtract
from fedge.privacy.mechanisms import DevicePrivacy, privatize_update
from fedge.tasks import Task, TrainConfig, load_task
from fedge.transport.base import Transport
from fedge.wire import (
    AbortReport,
    CheckIn,
    EvalReport,
    EventBatch,
    TaskInfo,
    TrainPlan,
    decode_params,
    encode_update,
    parse_message,
)

if TYPE_CHECKING:
    from fedge.transport.meter import WireMeter

__all__ = ["Agent", "backoff_delay", "run_agent", "training_rng"]

logger = logging.getLogger(__name__)

# A "wait 0 s" reply must not turn a fleet into a request storm.
_MIN_WAIT_S = 0.1
_WAIT_JITTER = 0.1
# Room beyond the params payload for JSON replies and headers.
_BODY_SLACK = 1024 * 1024
# A metrics report holds at most this many names (EvalReport's limit).
_MAX_METRICS = 64
# Device events go in batches of at most this many, at most every _EVENT_EVERY_S unless a batch is full.
_EVENT_BATCH = 50
_EVENT_EVERY_S = 10.0
# The capability benchmark's time bound (it trains one epoch of 256 synthetic examples).
_BENCH_MAX_S = 10.0
# How long a secure round's phase result may be held open by the coordinator (a long poll).
_LONG_POLL_S = 5.0

_T = TypeVar("_T")


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """The delay before retry number ``attempt`` (0 for the first) after failures in a row.

    "Full jitter" (M. Brooker, "Exponential Backoff And Jitter", AWS
    Architecture Blog, 2015): uniform on ``[0, min(cap_s, base_s * 2**attempt)]``.
    Drawing over the whole interval, rather than around its top, spreads a
    fleet that lost the coordinator at the same instant, so its restart is not
    met by every device at once.

    Args:
        attempt: how many failures in a row came before this one (>= 0).
        base_s: the bound for the first retry (> 0).
        cap_s: the largest bound (>= ``base_s``).
        rng: the jitter source.

    Returns:
        The delay in seconds.

    Raises:
        ValueError: an argument is out of range.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"attempt must be an integer >= 0, got {attempt!r}")
    if not (math.isfinite(base_s) and base_s > 0):
        raise ValueError(f"base_s must be a positive finite number, got {base_s}")
    if not (math.isfinite(cap_s) and cap_s >= base_s):
        raise ValueError(f"cap_s must be a finite number >= base_s ({base_s}), got {cap_s}")
    # Past 2**64 the bound is the cap for any sane base; the clamp avoids float overflow.
    bound = min(cap_s, base_s * 2.0 ** min(attempt, 64))
    return rng.uniform(0.0, bound)


def training_rng(device_id: str, round_id: int, attempt: int) -> np.random.Generator:
    """The generator local training draws from in one round attempt.

    Seeded by a 64-bit hash of the device id (SHA-256, so stable across
    processes and Python versions, unlike ``hash()``), the round and the
    attempt: a retried attempt reproduces its training, and no two devices
    or rounds share a stream.

    Args:
        device_id: this device's id.
        round_id: the round.
        attempt: the round's attempt.

    Returns:
        A fresh generator.
    """
    return np.random.default_rng([*_device_seed(device_id), round_id, attempt])


def _device_seed(device_id: str) -> tuple[int]:
    return (int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big"),)


def _encoding_rng(device_id: str, plan: TrainPlan) -> np.random.Generator:
    """The stream an update's stochastic rounding draws from: its own, since training may run in a
    child process (which leaves the training generator untouched here) and must not share draws."""
    return np.random.default_rng([*_device_seed(device_id), plan.round, plan.attempt, 1])


@dataclass(frozen=True)
class _Session:
    """What one :meth:`Agent.run` works with once its startup checks passed."""

    client: CoordinatorClient
    device_id: str
    data: Dataset
    top_label: int


@dataclass(frozen=True)
class _Pending:
    """An encoded update whose upload got no answer; sent again if the same invitation comes back."""

    key: tuple[int, int, str]
    body: bytes
    num_examples: int
    train_s: float


@dataclass(frozen=True)
class _Trained:
    """A round's training result, ready to encode: the (privatized) delta and what goes with it."""

    delta: Params
    num_examples: int
    metrics: dict[str, float]
    train_s: float


@dataclass(frozen=True)
class _TaskState:
    """The task built for the coordinator's :class:`~fedge.wire.TaskInfo`, and its params layout."""

    info: TaskInfo
    task: Task
    spec: ParamsSpec


class Agent:
    """A device agent: runs rounds for the coordinator until told to stop.

    Args:
        config: the agent's settings.
        transport: carries requests to the coordinator (:class:`~fedge.transport.http.HttpTransport`
            on a device, :class:`~fedge.transport.local.LocalTransport` in tests).
        rng: the jitter source for waits and backoff (default: seeded from the OS).
        sleep: waits the given seconds and may return early once :meth:`stop`
            is called (default: the stop event's ``wait``); tests inject one
            that records delays.
        clock: a monotonic clock in seconds, for deadlines and timings.
        meter: the meter ``transport`` counts its bytes in, or ``None``; its
            totals are kept in ``<state_dir>/wire.json`` (:mod:`fedge.agent.traffic`)
            and exported in the metrics file.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: Transport,
        rng: random.Random | None = None,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        meter: WireMeter | None = None,
    ) -> None:
        self._config = config
        self._transport = transport
        self._meter = meter
        self._rng = rng if rng is not None else random.Random()
        self._stop = threading.Event()
        self._sleep: Callable[[float], object] = sleep if sleep is not None else self._stop.wait
        self._clock = clock
        self._failures = 0
        self._task: _TaskState | None = None
        self._cached: tuple[str, Params] | None = None
        self._pending: _Pending | None = None
        self._finished: tuple[int, int, str] | None = None
        self._pipeline: Pipeline | None = None
        # The policy's eyes: the monitor counts the training child's CPU as the agent's own.
        self._monitor = Monitor(disk_path=config.state_dir, own_cpu_s=self._own_cpu_s)
        self._rounds_today: RoundsToday | None = None
        self._trainer = Trainer(config.limits, config.policy, self._monitor, rounds_today=self._count_today)
        self._profiles: ProfileCache | None = None
        self._last_verdict: Verdict | None = None
        self.events = EventLog()
        self._metrics_file_failed = False
        self._events_sent_at = -math.inf

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has been called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the agent to stop: sleeps end now, training in progress is abandoned.

        Thread-safe, and safe to call from a signal handler; :meth:`run`
        returns 0 soon after.
        """
        if not self._stop.is_set():
            self._stop.set()
            logger.info("stopping")

    def run(self) -> int:
        """Check the local setup, then run rounds until stopped or training is over.

        Returns:
            The exit status: 0 after a stop or when the coordinator says "done".

        Raises:
            ConfigError: the state directory cannot be created, written or
                locked (another agent runs on it); the device id kept there is
                malformed; the data file is missing or malformed; or the data
                does not fit the task the coordinator announces.
        """
        # Events are made from the agent's log records at INFO and above, whatever level the
        # console shows (the CLI filters its own handler, not the loggers).
        handler = EventHandler(self.events)
        agent_logger = logging.getLogger("fedge.agent")
        saved = agent_logger.level
        if agent_logger.getEffectiveLevel() > logging.INFO:
            agent_logger.setLevel(logging.INFO)
        agent_logger.addHandler(handler)
        try:
            return self._run()
        finally:
            agent_logger.removeHandler(handler)
            agent_logger.setLevel(saved)

    def _run(self) -> int:
        with StateLock(self._config.state_dir):
            device_id = resolve_device_id(self._config.state_dir, self._config.device_id)
            self._rounds_today = RoundsToday(self._config.state_dir)
            self._profiles = ProfileCache(self._config.state_dir)
            data = load_file(self._config.data)
            logger.info(
                "agent %s: %d examples from %s; coordinator %s",
                device_id, len(data), self._config.data, self._config.coordinator,
                extra={"event": "start"},
            )
            client = CoordinatorClient(
                self._transport, device_id=device_id, timeout_s=self._config.request_timeout_s
            )
            session = _Session(client, device_id, data, int(data.y.max()))
            if self._meter is None:
                status = self._loop(session)
            else:
                # Under the state lock: only the agent that owns the state directory writes wire.json.
                with WireRecorder(self._meter, self._config.state_dir / WIRE_FILE):
                    status = self._loop(session)
        if self._meter is None:
            logger.info("stopped", extra={"event": "stop"})
        else:
            # The totals in the log too: wire.json cannot be written while the disk is full.
            counts = self._meter.counts()
            logger.info("stopped", extra={"event": "stop", "wire_sent": counts.sent,
                                          "wire_received": counts.received,
                                          "wire_connections": counts.connections})
        return status

    # ------------------------------------------------------------- the loop

    def _loop(self, session: _Session) -> int:
        while not self._stop.is_set():
            try:
                reply = session.client.check_in(self._check_in(session))
            except TransportError as e:
                self._retry_later("coordinator unreachable", e)
                continue
            except RefusalError as e:
                self._retry_later("check-in refused (check the coordinator and this config)", e,
                                  level=logging.ERROR)
                continue
            except ProtocolError as e:
                self._retry_later("unusable check-in reply", e, level=logging.ERROR)
                continue
            received_at = self._clock()
            self._send_events(session)
            if reply.action != "train":
                # A train reply resets the count only once its round ends well, so a
                # coordinator that answers check-ins but fails uploads is not hammered.
                self._failures = 0
            self._check_fit(reply.task, session)
            if reply.action == "done":
                logger.info("the coordinator says training is over; exiting")
                return 0
            task = self._task_for(reply.task)
            if self._stop.is_set():
                break
            if reply.action == "wait":
                delay = max(_MIN_WAIT_S, reply.wait_s * self._rng.uniform(1 - _WAIT_JITTER, 1 + _WAIT_JITTER))
                logger.debug("waiting %.1f s", delay)
                self._sleep(delay)
            elif reply.plan is None:
                self._retry_later("unusable check-in reply", "action 'train' without a plan",
                                  level=logging.ERROR)
            else:
                self._round(session, task, reply.plan, received_at)
        return 0

    def _round(self, session: _Session, task: _TaskState, plan: TrainPlan, received_at: float) -> None:
        """One invitation; every failure ends it and sends the loop back to check-in."""
        label = f"round {plan.round} attempt {plan.attempt}"
        if self._finished == _key(plan):
            # Offered again after a refusal or a skip: training it again would
            # be refused again, so wait instead of spinning.
            self._retry_later(label, "offered again after this agent finished with it")
            return
        try:
            self._train_and_upload(session, task, plan, received_at, label)
        except TransportError as e:
            self._retry_later(f"{label}: coordinator unreachable", e)
        except RefusalError as e:
            self._finished = _key(plan)
            self._failures = 0
            logger.warning("%s: %s", label, e)
        except ProtocolError as e:
            self._finished = _key(plan)
            self._retry_later(f"{label}: unusable answer from the coordinator", e, level=logging.ERROR)
        except TaskError as e:
            self._finished = _key(plan)
            self._retry_later(f"{label}: the task failed", e, level=logging.ERROR)
        else:
            self._failures = 0

    def _train_and_upload(
        self, session: _Session, task: _TaskState, plan: TrainPlan, received_at: float, label: str
    ) -> None:
        if plan.secagg is not None:
            self._secure_round(session, task, plan, received_at, label)
            return
        pending = self._pending
        if pending is not None and pending.key == _key(plan):
            logger.info("%s: sending the update again (its upload got no answer)", label)
            self._upload(session, plan, pending, label)
            return
        self._pending = None
        params = self._fetch_params(session, task, plan, label)
        if params is None or self._abandoned(label):
            return
        trained = self._evaluate_and_train(session, task, plan, params, received_at, label)
        if trained is None:
            return
        # The local training time goes with the update, so the coordinator can
        # tell training from protocol overhead in a round's duration.
        metrics = {**trained.metrics, "train_s": trained.train_s}
        tensors, encoding = self._encode(plan, task, trained.delta, _encoding_rng(session.device_id, plan))
        body = encode_update(
            tensors, round=plan.round, attempt=plan.attempt, num_examples=trained.num_examples,
            metrics=metrics, encoding=encoding,
        )
        if self._past_deadline(plan, received_at, label):
            return
        pending = _Pending(_key(plan), body, trained.num_examples, trained.train_s)
        self._pending = pending
        self._upload(session, plan, pending, label)

    def _secure_round(
        self, session: _Session, task: _TaskState, plan: TrainPlan, received_at: float, label: str
    ) -> None:
        """A round under secure aggregation: the key phases, training, the masked upload, unmasking."""
        # Imported here: the X25519/AES code loads only when a secure round happens.
        from fedge.agent.secagg import SecureSession, SessionStopped

        params = self._fetch_params(session, task, plan, label)
        if params is None or self._abandoned(label):
            return
        secure = SecureSession(
            session.client, plan, session.device_id, received_at=received_at, clock=self._clock,
            sleep=self._sleep, stopping=self._stop.is_set,
            backoff=lambda n: backoff_delay(n, base_s=self._config.backoff_base_s,
                                            cap_s=self._config.backoff_cap_s, rng=self._rng),
            # Held open by the coordinator until a phase closes, well within the request timeout;
            # a stop waits for at most one such request.
            long_poll_s=min(_LONG_POLL_S, self._config.request_timeout_s / 2),
        )
        try:
            secure.exchange_keys()
            if self._abandoned(label):
                return
            trained = self._evaluate_and_train(session, task, plan, params, received_at, label)
            if trained is None or self._past_deadline(plan, received_at, label):
                return
            size = secure.upload(trained.delta, num_examples=trained.num_examples, train_s=trained.train_s,
                                 rng=_encoding_rng(session.device_id, plan))
            self._finished = _key(plan)
            if self._rounds_today is not None:
                self._rounds_today.add()
            logger.info("%s: trained %d examples in %.2f s, uploaded a masked vector of %.1f KiB",
                        label, trained.num_examples, trained.train_s, size / 1024)
            sent = secure.unmask()
            logger.info("%s: answered the unmask request (%d shares)", label, sent)
        except SessionStopped:
            logger.info("stopping: %s abandoned (secure aggregation)", label)

    def _evaluate_and_train(
        self, session: _Session, task: _TaskState, plan: TrainPlan, params: Params, received_at: float,
        label: str,
    ) -> _Trained | None:
        """Evaluate the round's params (if asked), train, and privatize the delta as the plan says.

        ``None`` when training stopped (the coordinator is told) or the agent is stopping.
        """
        if plan.evaluate:
            self._report_evaluation(session, task, plan, params, label)
            if self._abandoned(label):
                return None
        config = TrainConfig(
            local_epochs=plan.local_epochs, batch_size=plan.batch_size, lr=plan.lr, mu=plan.mu
        )
        started = self._clock()
        rng = training_rng(session.device_id, plan.round, plan.attempt)
        try:
            # In a child process under the [limits], paused or stopped by the [policy].
            result, stats = self._trainer.run(
                lambda: task.task.train(params, session.data, config, rng),
                max_s=plan.deadline_s - (started - received_at), what="task.train",
            )
        except TrainingStopped as stop:
            self._finished = _key(plan)
            logger.warning("%s: training stopped: %s", label, stop, extra={"event": "abort"})
            session.client.send_abort(AbortReport(round=plan.round, attempt=plan.attempt,
                                                  reasons=[r[:200] for r in stop.reasons[:16]]))
            return None
        train_s = self._clock() - started
        if stats.pauses:
            logger.info("%s: training paused %d times (%.1f s) for other work", label, stats.pauses,
                        stats.paused_s)
        if self._abandoned(label):
            return None
        delta = _delta(result.params, params, task.spec)
        try:
            check_finite(delta, what="update")
        except ValueError as e:
            raise TaskError(f"training diverged: {e}") from None
        if plan.clip_norm is not None:
            delta = _privatize(delta, plan)
        metrics = _finite_metrics(result.metrics, label, "training")
        return _Trained(delta, result.num_examples, metrics, train_s)

    def _past_deadline(self, plan: TrainPlan, received_at: float, label: str) -> bool:
        elapsed = self._clock() - received_at
        if elapsed > plan.deadline_s:
            self._finished = _key(plan)
            logger.warning(
                "%s: past the deadline (%.1f s of %.1f s); not uploading", label, elapsed, plan.deadline_s
            )
            return True
        return False

    def _encode(
        self, plan: TrainPlan, task: _TaskState, delta: Params, rng: np.random.Generator
    ) -> tuple[Params, str]:
        """Encode ``delta`` as the coordinator's plan says; keep top-k's residual in the state dir.

        Raises:
            ProtocolError: the plan names an encoding this build cannot make.
        """
        info = plan.encoding
        config = EncodingConfig(info.compress, info.bucket_size, info.shared_range)
        if self._pipeline is None or self._pipeline.config != config:
            try:
                self._pipeline = build_pipeline(config, secure_aggregation=False)
            except ConfigError as e:
                raise ProtocolError("bad_plan", f"the train plan's encoding is unusable: {e}") from None
        pipe = self._pipeline
        if pipe.identity:
            return delta, pipe.name
        state_dir = self._config.state_dir
        residual = None
        if pipe.error_feedback:
            residual = load_residual(state_dir, spec=task.spec, encoding=pipe.name)
        encoded = pipe.encode(delta, rng=rng, residual=residual)
        if encoded.residual is not None:
            try:
                save_residual(state_dir, encoded.residual, encoding=pipe.name)
            except OSError as e:
                logger.warning("cannot keep the error-feedback residual (%s); it is lost", e.strerror)
        return encoded.tensors, pipe.name

    def _upload(self, session: _Session, plan: TrainPlan, pending: _Pending, label: str) -> None:
        try:
            session.client.send_update(plan.round, pending.body)
        except RefusalError:
            self._pending = None  # a refused upload is never sent again
            raise
        self._pending = None
        self._finished = _key(plan)
        if self._rounds_today is not None:
            self._rounds_today.add()
        logger.info(
            "%s: trained %d examples in %.2f s, uploaded %.1f KiB",
            label, pending.num_examples, pending.train_s, len(pending.body) / 1024,
        )

    # -------------------------------------------------------------- steps

    def _check_fit(self, info: TaskInfo, session: _Session) -> None:
        """Refuse local data whose shape does not fit the coordinator's task (exit 2, not a retry)."""
        source, shape, top = self._config.data, session.data.x.shape, session.top_label
        if shape[1] != info.num_features:
            raise ConfigError(
                f"{source}: data has {shape[1]} features (shape {shape}), but the "
                f"coordinator's task {info.name!r} expects {info.num_features} features"
            )
        if top >= info.num_classes:
            raise ConfigError(
                f"{source}: data has label {top}, but the coordinator's task {info.name!r} has "
                f"{info.num_classes} classes (labels 0 to {info.num_classes - 1})"
            )

    def _task_for(self, info: TaskInfo) -> _TaskState:
        """The task for ``info``, built on first sight and rebuilt when it changes."""
        if self._task is not None and self._task.info == info:
            return self._task
        task = load_task(info.name, DataSpec(info.num_features, info.num_classes))
        # Only the layout (names, shapes, dtypes) is kept: the values come from the coordinator.
        spec = ParamsSpec.of(_call_task("init_params", lambda: task.init_params(np.random.default_rng(0))))
        self._task = _TaskState(info, task, spec)
        self._cached = None
        self._benchmark(info, task)
        logger.info(
            "task %s: %d features, %d classes, %d parameters",
            info.name, info.num_features, info.num_classes, spec.size,
        )
        return self._task

    # ------------------------------------------------------------ runtime

    def _send_events(self, session: _Session) -> None:
        """Send queued events after a check-in: a batch when 50 wait or 10 s have passed.

        A refused or failed batch goes back to the queue; events never hold up a round.
        """
        now = self._clock()
        waiting = len(self.events)
        if not waiting or (waiting < _EVENT_BATCH and now - self._events_sent_at < _EVENT_EVERY_S):
            return
        batch = self.events.take(_EVENT_BATCH)
        self._events_sent_at = now
        try:
            message = EventBatch.model_validate({"events": batch})
        except ValidationError as e:  # cannot happen with EventLog's events; never worth a crash
            logger.debug("dropping a malformed event batch: %s", e)
            return
        try:
            session.client.send_events(message)
        except (TransportError, RefusalError, ProtocolError) as e:
            self.events.put_back(batch)
            logger.debug("events not sent (%s); kept for later", e)

    def _own_cpu_s(self) -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + self._trainer.child_cpu_s()

    def _count_today(self) -> int:
        return self._rounds_today.count() if self._rounds_today is not None else 0

    def _check_in(self, session: _Session) -> CheckIn:
        """The check-in: data held, the policy's verdict and why, readings and capabilities."""
        readings = self._monitor.read()
        v = verdict(self._config.policy, readings, now=dt.datetime.now(), rounds_today=self._count_today())
        last, self._last_verdict = self._last_verdict, v
        if last is None or (last.ok, last.reasons) != (v.ok, v.reasons):
            if v.ok:
                logger.info("policy: training allowed%s", f" ({'; '.join(v.notes)})" if v.notes else "",
                            extra={"event": "policy"})
            else:
                logger.info("policy: not training now: %s", "; ".join(v.reasons), extra={"event": "policy"})
        fields = self._profile_fields(readings, v)
        if self._config.metrics_file is not None:
            self._write_metrics(readings, v, fields)
        return CheckIn(num_examples=len(session.data), ready=v.ok, profile=fields)

    def _write_metrics(self, readings: Readings, v: Verdict, fields: Mapping[str, object]) -> None:
        assert self._config.metrics_file is not None
        mb = 1024.0 * 1024.0

        def scaled(value: float | None, factor: float) -> float | None:
            return None if value is None else value * factor

        rate = fields.get("examples_per_s")
        try:
            write_textfile(self._config.metrics_file, {
                "fedge_agent_policy_ok": 1.0 if v.ok else 0.0,
                "fedge_agent_rounds_today": float(self._count_today()),
                "fedge_agent_cpu_load": readings.cpu_load,
                "fedge_agent_memory_available_bytes": scaled(readings.memory_available_mb, mb),
                "fedge_agent_battery_percent": readings.battery_percent,
                "fedge_agent_on_ac": None if readings.on_ac is None else float(readings.on_ac),
                "fedge_agent_temperature_celsius": readings.temperature_c,
                "fedge_agent_disk_free_bytes": scaled(readings.disk_free_mb, mb),
                "fedge_agent_cpu_seconds_total": float(str(fields["agent_cpu_s"])),
                "fedge_agent_resident_memory_bytes": float(str(fields["agent_rss_mb"])) * mb,
                "fedge_agent_examples_per_second": float(rate) if isinstance(rate, int | float) else None,
                "fedge_agent_events_queued": float(len(self.events)),
                'fedge_agent_wire_bytes_total{direction="up"}': self._wire("sent"),
                'fedge_agent_wire_bytes_total{direction="down"}': self._wire("received"),
            })
        except OSError as e:
            if not self._metrics_file_failed:  # once, not on every check-in
                logger.warning("cannot write the metrics file %s (%s)", self._config.metrics_file, e)
            self._metrics_file_failed = True
        else:
            self._metrics_file_failed = False

    def _wire(self, direction: str) -> float | None:
        if self._meter is None:
            return None
        return float(self._meter.sent if direction == "sent" else self._meter.received)

    def _profile_fields(self, readings: Readings, v: Verdict) -> dict[str, str | int | float | bool]:
        fields: dict[str, str | int | float | bool] = {"fedge_version": __version__}
        if self._profiles is not None:
            p = self._profiles.profile
            fields.update(cores=p.cores, memory_mb=p.memory_mb, arch=p.arch,
                          accelerators=",".join(p.accelerators) or "none")
            if p.examples_per_s is not None:
                fields["examples_per_s"] = p.examples_per_s
        fields["policy"] = "ok" if v.ok else "; ".join(v.reasons)[:500]
        for key, value in readings.to_json().items():
            if value is not None and key != "cores":
                fields[key] = value
        overhead = agent_overhead()
        fields["agent_cpu_s"] = overhead["cpu_s"]
        fields["agent_rss_mb"] = overhead["rss_mb"]
        return fields

    def _benchmark(self, info: TaskInfo, task: Task) -> None:
        """Measure training throughput on synthetic data of the task's shape, if the cache is stale."""
        profiles = self._profiles
        if profiles is None or not profiles.stale(info.name):
            return
        rng = np.random.default_rng(0)
        n = 256
        data = Dataset(rng.normal(size=(n, info.num_features)).astype(np.float32),
                       rng.integers(0, info.num_classes, size=n))
        config = TrainConfig(local_epochs=1, batch_size=32, lr=0.01, mu=0.0)

        def bench() -> tuple[int, float]:
            params = task.init_params(rng)
            t0 = time.perf_counter()
            task.train(params, data, config, rng)
            return n, time.perf_counter() - t0

        # In the training child, under the limits and the policy, and bounded: a slow
        # device must not spend a round's worth of time on its benchmark.
        bound = min(_BENCH_MAX_S, self._config.limits.max_train_s or _BENCH_MAX_S)
        try:
            profiles.measure(info.name, lambda: self._trainer.run(bench, max_s=bound, what="benchmark")[0])
        except (TaskError, TrainingStopped) as e:
            logger.warning("capability benchmark skipped (%s); the profile has no throughput yet", e)

    def _fetch_params(
        self, session: _Session, task: _TaskState, plan: TrainPlan, label: str
    ) -> Params | None:
        """The round's params, or ``None`` if the coordinator already serves others."""
        cached = self._cached
        reply = session.client.fetch_params(plan.round, etag=cached[0] if cached is not None else None)
        if reply.etag != plan.params_etag:
            self._finished = _key(plan)
            logger.info("%s: the coordinator serves other params now; the round moved on", label)
            return None
        if reply.body is None:
            if cached is None or cached[0] != reply.etag:
                raise ProtocolError(
                    "unexpected_status", "304 Not Modified for params this agent does not hold"
                )
            logger.debug("%s: params not modified", label)
            return cached[1]
        params, _ = decode_params(reply.body, spec=task.spec, max_bytes=self._config.max_payload_bytes)
        self._cached = (reply.etag, params)
        logger.debug("%s: downloaded %.1f KiB of params", label, len(reply.body) / 1024)
        return params

    def _report_evaluation(
        self, session: _Session, task: _TaskState, plan: TrainPlan, params: Params, label: str
    ) -> None:
        """Federated evaluation of the round's params on local data, sent before training."""
        metrics = _call_task("evaluate", lambda: task.task.evaluate(params, session.data))
        report = parse_message(EvalReport, {
            "round": plan.round, "attempt": plan.attempt, "num_examples": len(session.data),
            "metrics": _finite_metrics(metrics, label, "evaluation"),
        })
        try:
            session.client.send_metrics(report)
        except RefusalError as e:
            if e.reason != "duplicate":
                raise
            # Sent before, by an earlier try whose answer was lost: the update is still due.
            logger.info("%s: evaluation already reported", label)
            return
        logger.debug("%s: evaluation reported", label)

    # ------------------------------------------------------------ helpers

    def _abandoned(self, label: str) -> bool:
        if self._stop.is_set():
            logger.info("stopping: %s abandoned, nothing uploaded", label)
            return True
        return False

    def _retry_later(self, what: str, error: Exception | str, *, level: int = logging.WARNING) -> None:
        delay = backoff_delay(
            self._failures, base_s=self._config.backoff_base_s, cap_s=self._config.backoff_cap_s,
            rng=self._rng,
        )
        self._failures += 1
        logger.log(level, "%s: %s; retrying in %.1f s", what, error, delay)
        self._sleep(delay)


def _key(plan: TrainPlan) -> tuple[int, int, str]:
    """What identifies one invitation; the ETag tells a wiped coordinator's round 1 from the old one."""
    return (plan.round, plan.attempt, plan.params_etag)


def _call_task(what: str, call: Callable[[], _T]) -> _T:
    """Run user task code; whatever it raises becomes a :class:`TaskError`.

    The agent loop is a process edge: a task's bug must end the round, not the
    agent, and its message goes to the log on one line.
    """
    try:
        return call()
    except (TaskError, ConfigError):
        raise
    except Exception as e:
        raise TaskError(f"task.{what} raised {type(e).__name__}: {e}") from e


def _privatize(delta: Params, plan: TrainPlan) -> Params:
    """Local DP: clip the update and add the plan's noise, drawn from the OS entropy, before it leaves."""
    assert plan.clip_norm is not None
    how = DevicePrivacy(clip_norm=plan.clip_norm, local_stddev=plan.noise_stddev, seed=None)
    private, _ = privatize_update(delta, how, round_id=plan.round, device_id=plan.attempt)
    return private


def _delta(trained: Params, start: Params, spec: ParamsSpec) -> Params:
    """``trained - start`` in the round's dtypes (a task may hand back wider floats)."""
    try:
        delta = subtract(trained, start)
    except ValueError as e:
        raise TaskError(f"task.train returned params of another structure: {e}") from None
    return {
        name: np.asarray(delta[name], dtype=np.dtype(dt))
        for name, dt in zip(spec.names, spec.dtypes, strict=True)
    }


def _finite_metrics(metrics: Mapping[str, float], label: str, what: str) -> dict[str, float]:
    """The finite metrics (at most 64); the coordinator refuses a report holding NaN or infinity."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                or not math.isfinite(value) or len(kept) >= _MAX_METRICS:
            dropped.append(str(name))
        else:
            kept[str(name)] = float(value)
    if dropped:
        logger.warning("%s: %s metrics %s dropped (not finite numbers, or too many)", label, what, dropped)
    return kept


# ---------------------------------------------------------------- process


def run_agent(config: AgentConfig, *, transport: Transport | None = None) -> int:
    """Run a device agent in this process until SIGTERM, SIGINT or "done".

    The first SIGTERM or SIGINT stops the agent cleanly (see :meth:`Agent.stop`);
    a second one acts as it would have without the agent (SIGINT raises
    ``KeyboardInterrupt``), for an operator who cannot wait for training to end.

    Args:
        config: the agent's settings.
        transport: carries requests; default an
            :class:`~fedge.transport.http.HttpTransport` to ``config.coordinator``,
            closed on return, whose bytes on the wire are counted and kept in
            ``<state_dir>/wire.json`` (:mod:`fedge.agent.traffic`).

    Returns:
        The exit status: 0.

    Raises:
        ConfigError: as :meth:`Agent.run`.
    """
    owned = meter = None
    if transport is None:
        from fedge.transport.meter import WireMeter

        # One meter for every connection of this run, enrolment included.
        meter = WireMeter()
        transport = owned = _transport_for(config, meter)
    if config.coordinator.lower().startswith("http://"):
        logger.warning(
            "INSECURE: coordinator %s is plain HTTP: updates travel unencrypted and unauthenticated",
            config.coordinator,
        )
    agent = Agent(config, transport=transport, meter=meter)
    restore = _install_signal_handlers(agent)
    try:
        return agent.run()
    finally:
        restore()
        close = getattr(owned, "close", None)
        if callable(close):
            close()


def _transport_for(config: AgentConfig, meter: WireMeter) -> Transport:
    """Plain HTTP (``insecure``), or mutual TLS with this device's enrolled identity; counted in ``meter``."""
    from fedge.transport.http import HttpTransport

    max_body = config.max_payload_bytes + _BODY_SLACK
    if config.coordinator.lower().startswith("http://"):
        return HttpTransport(config.coordinator, max_body_bytes=max_body, meter=meter)
    from fedge.agent.identity import DeviceIdentity, MutualTlsTransport
    from fedge.transport.tls import client_ssl_context

    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = DeviceIdentity(state, resolve_device_id(state, config.device_id))
    identity.ensure_key()
    if config.ca_cert is None and config.ca_fingerprint is None and not identity.ca_file.exists():
        raise ConfigError("an https:// coordinator needs the CA to trust: give --ca-cert FILE or "
                          "--ca-fingerprint SHA256 (printed by `fedge ca init`)")
    token = config.token
    if token is None and config.token_file is not None and identity.certificate_not_after() is None:
        try:
            token = config.token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"token_file {config.token_file}: cannot read ({e.strerror})") from None

    def make(ca_file: Path, cert_file: Path | None, key_file: Path | None) -> Transport:
        try:
            context = client_ssl_context(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS files in {state} cannot be used: {e}") from None
        return HttpTransport(config.coordinator, verify=context, max_body_bytes=max_body, meter=meter)

    return MutualTlsTransport(identity, make, config=config, token=token)


def _install_signal_handlers(agent: Agent) -> Callable[[], None]:
    """Route SIGTERM and SIGINT to ``agent.stop``; returns what puts the old handlers back."""
    if threading.current_thread() is not threading.main_thread():
        logger.debug("not the main thread: signal handlers left alone")
        return lambda: None
    signums = (signal.SIGTERM, signal.SIGINT)
    # getsignal answers None for a handler installed outside Python; the default stands in.
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in signums}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.info("received %s", signal.Signals(signum).name)
        restore()  # a second signal does what it would have done without the agent
        agent.stop()

    for s in signums:
        signal.signal(s, on_signal)
    return restore

"""Tests for fedge.agent: config loading, backoff, and the loop against an in-process coordinator.

The fake coordinator below serves the ``/v1`` routes over the real transport
seam (:class:`~fedge.transport.local.LocalTransport`) and speaks the real wire
format: it parses check-ins and reports with :mod:`fedge.wire` and decodes
updates with :func:`fedge.wire.decode_update`, so the agent is checked against
the protocol, not against mocks of it.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

from fedge.agent import Agent, AgentConfig, backoff_delay, load_agent_config, training_rng
from fedge.agent.policy import parse_policy
from fedge.agent.state import DEVICE_ID_FILE
from fedge.agent.trainer import parse_limits
from fedge.data.dataset import DataSpec
from fedge.data.files import load_file
from fedge.errors import ConfigError, TransportError
from fedge.params import ParamsSpec
from fedge.tasks import TrainConfig, load_task
from fedge.transport import LocalTransport, Request, Response
from fedge.wire import (
    DEVICE_HEADER,
    AbortReport,
    CheckIn,
    CheckInReply,
    EvalReport,
    TaskInfo,
    TrainPlan,
    Update,
    UpdateAck,
    decode_update,
    encode_params,
    parse_message,
    payload_etag,
)

LOGREG = TaskInfo(name="logreg", num_features=4, num_classes=3)
NUM_EXAMPLES = 30
Script = CheckInReply | Response | Exception


# --------------------------------------------------------------- fake coordinator


def refusal(code: str, detail: str, status: int) -> Response:
    body = json.dumps({"error": code, "detail": detail}).encode()
    return Response(status, {"content-type": "application/json"}, body)


def ok_json(message: CheckInReply | UpdateAck) -> Response:
    return Response(200, {"content-type": "application/json"}, message.model_dump_json().encode())


class FakeCoordinator:
    """Serves the agent's routes from a script of check-in replies; records what it saw."""

    def __init__(self, checkins: Iterable[Script], *, info: TaskInfo = LOGREG) -> None:
        self.info = info
        self.task = load_task(info.name, DataSpec(info.num_features, info.num_classes))
        self.params = self.task.init_params(np.random.default_rng(7))
        self.spec = ParamsSpec.of(self.params)
        self.payload = encode_params(self.params)
        self.etag = payload_etag(self.payload)
        self.checkins: deque[Script] = deque(checkins)
        self.overrides: dict[str, deque[Response | Exception]] = {
            "params": deque(), "metrics": deque(), "update": deque(), "abort": deque(),
        }
        self.hooks: dict[str, Callable[[], None]] = {}
        self.events: list[tuple[object, ...]] = []
        self.devices: list[str | None] = []
        self.reports: list[EvalReport] = []
        self.updates: list[Update] = []
        self.update_bodies: list[bytes] = []
        self.hellos: list[CheckIn] = []
        self.aborts: list[AbortReport] = []

    def plan(self, round_id: int = 1, attempt: int = 1, **fields: object) -> CheckInReply:
        values: dict[str, object] = {
            "round": round_id, "attempt": attempt, "params_etag": self.etag, "deadline_s": 60.0,
            "local_epochs": 2, "batch_size": 8, "lr": 0.1,
        }
        values.update(fields)
        return CheckInReply(action="train", task=self.info, plan=TrainPlan.model_validate(values))

    def wait(self, wait_s: float) -> CheckInReply:
        return CheckInReply(action="wait", wait_s=wait_s, task=self.info)

    def done(self) -> CheckInReply:
        return CheckInReply(action="done", task=self.info)

    def __call__(self, req: Request) -> Response:
        self.devices.append(req.headers.get(DEVICE_HEADER.lower()))
        if req.method == "POST" and req.path == "/v1/check-in":
            return self._check_in(req)
        m = re.fullmatch(r"/v1/rounds/(\d+)/(params|metrics|update|abort)", req.path)
        assert m is not None, req.path
        round_id, route = int(m[1]), m[2]
        hook = self.hooks.get(route)
        if hook is not None:
            hook()
        if self.overrides[route]:
            self.events.append((route, "overridden"))
            return self._answer(self.overrides[route].popleft())
        if route == "params":
            assert req.method == "GET"
            tag = req.headers.get("if-none-match")
            if tag == self.etag:
                self.events.append(("params", 304))
                return Response(304, {"etag": self.etag})
            self.events.append(("params", 200))
            headers = {"etag": self.etag, "content-type": "application/octet-stream"}
            return Response(200, headers, self.payload)
        assert req.method == "POST" and req.content is not None
        if route == "abort":
            abort = parse_message(AbortReport, req.content)
            self.aborts.append(abort)
            self.events.append(("abort", abort.round, abort.attempt))
            return ok_json(UpdateAck(round=abort.round, attempt=abort.attempt))
        if route == "metrics":
            assert req.headers["content-type"] == "application/json"
            report = parse_message(EvalReport, req.content)
            assert report.round == round_id
            self.reports.append(report)
            self.events.append(("metrics", report.round, report.attempt))
            return ok_json(UpdateAck(round=report.round, attempt=report.attempt))
        assert req.headers["content-type"] == "application/octet-stream"
        update = decode_update(req.content, spec=self.spec, max_bytes=1 << 24)
        assert update.round == round_id
        self.updates.append(update)
        self.update_bodies.append(req.content)
        self.events.append(("update", update.round, update.attempt))
        return ok_json(UpdateAck(round=update.round, attempt=update.attempt))

    def _check_in(self, req: Request) -> Response:
        assert req.content is not None and req.headers["content-type"] == "application/json"
        hello = parse_message(CheckIn, req.content)
        self.hellos.append(hello)
        self.events.append(("check-in", hello.num_examples))
        hook = self.hooks.get("check-in")
        if hook is not None:
            hook()
        step = self.checkins.popleft() if self.checkins else self.done()
        if isinstance(step, CheckInReply):
            return ok_json(step)
        return self._answer(step)

    @staticmethod
    def _answer(step: Response | Exception) -> Response:
        if isinstance(step, Exception):
            raise step
        return step


class FixedRandom(random.Random):
    """A jitter source whose every draw sits at ``fraction`` of its interval."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def random(self) -> float:
        return self.fraction


class Sleeps:
    """Records requested delays without sleeping; stops the agent if it loops too long."""

    def __init__(self, limit: int = 50) -> None:
        self.delays: list[float] = []
        self.limit = limit
        self.agent: Agent | None = None

    def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        if len(self.delays) >= self.limit and self.agent is not None:
            self.agent.stop()


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "local.npz"
    np.savez(path, x=rng.normal(size=(NUM_EXAMPLES, 4)), y=np.arange(NUM_EXAMPLES) % 3)
    return path


def make_config(tmp_path: Path, data_file: Path, **fields: object) -> AgentConfig:
    values: dict[str, object] = {
        "coordinator": "http://coordinator.test", "data": data_file, "state_dir": tmp_path / "state",
        "backoff_base_s": 0.5, "backoff_cap_s": 3.0, "insecure": True,
    }
    values.update(fields)
    return AgentConfig(**values)  # type: ignore[arg-type]


def make_agent(
    config: AgentConfig, fake: FakeCoordinator, *, fraction: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Agent, Sleeps]:
    sleeps = Sleeps()
    agent = Agent(
        config, transport=LocalTransport(fake), rng=FixedRandom(fraction),
        sleep=sleeps, clock=clock,
    )
    sleeps.agent = agent
    return agent, sleeps


def run_in_thread(agent: Agent) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(agent.run())
        except Exception as e:  # handed to the test thread
            outcome.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


# ------------------------------------------------------------------- rounds


def test_full_round_reports_evaluation_then_uploads_the_delta(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.plan(3, 2), fake.done()])
    config = make_config(tmp_path, data_file, device_id="gateway-07")
    agent, sleeps = make_agent(config, fake)
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        assert agent.run() == 0
    assert fake.events == [
        ("check-in", NUM_EXAMPLES), ("params", 200), ("metrics", 3, 2), ("update", 3, 2),
        ("check-in", NUM_EXAMPLES),
    ]
    assert sleeps.delays == []
    assert set(fake.devices) == {"gateway-07"}
    (report,) = fake.reports
    assert report.num_examples == NUM_EXAMPLES and {"loss", "accuracy"} <= report.metrics.keys()
    (update,) = fake.updates
    assert update.num_examples == NUM_EXAMPLES
    assert ParamsSpec.of(update.delta) == fake.spec
    # The delta is exactly what local training from the served params gives with the agent's seed.
    expected = fake.task.train(
        fake.params, load_file(data_file), TrainConfig(local_epochs=2, batch_size=8, lr=0.1),
        training_rng("gateway-07", 3, 2),
    )
    for name, start in fake.params.items():
        np.testing.assert_array_equal(update.delta[name], expected.params[name] - start)
    assert any(np.abs(d).max() > 0 for d in update.delta.values())
    assert update.metrics.pop("train_s") >= 0
    assert update.metrics == pytest.approx(dict(expected.metrics))
    progress = r"round 3 attempt 2: trained 30 examples in \d+\.\d\d s, uploaded \d+\.\d KiB"
    assert any(re.fullmatch(progress, r.message) for r in caplog.records)
    assert "the coordinator says training is over" in caplog.text


def test_no_evaluation_report_unless_the_plan_asks(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.plan(evaluate=False))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert [e[0] for e in fake.events] == ["check-in", "params", "update", "check-in"]


def test_wait_then_train(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.wait(2.0), fake.plan()])
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake, fraction=0.5)
    assert agent.run() == 0
    assert sleeps.delays == [pytest.approx(2.0)]
    assert [e[0] for e in fake.events] == ["check-in", "check-in", "params", "metrics", "update", "check-in"]


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 9.0), (1.0, 11.0)])
def test_wait_is_jittered_by_ten_percent(
    tmp_path: Path, data_file: Path, fraction: float, expected: float
) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.wait(10.0), fake.wait(0.0)])
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake, fraction=fraction)
    assert agent.run() == 0
    assert sleeps.delays[0] == pytest.approx(expected)
    assert sleeps.delays[1] > 0  # "wait 0 s" never becomes a request storm


def test_done_exits_zero_at_once(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert fake.events == [("check-in", NUM_EXAMPLES)] and sleeps.delays == []


def test_refused_upload_goes_back_to_check_in(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCoordinator([])
    # The coordinator restarted the round as attempt 2: the attempt-1 upload is refused.
    fake.checkins.extend([fake.plan(1, 1), fake.plan(1, 2)])
    fake.overrides["update"].append(refusal("closed", "round 1 attempt 1 has ended", 409))
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        assert agent.run() == 0
    assert fake.events == [
        ("check-in", NUM_EXAMPLES), ("params", 200), ("metrics", 1, 1), ("update", "overridden"),
        ("check-in", NUM_EXAMPLES), ("params", 304), ("metrics", 1, 2), ("update", 1, 2),
        ("check-in", NUM_EXAMPLES),
    ]
    assert sleeps.delays == []
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "closed" in warning.message and "round 1 attempt 1 has ended" in warning.message
    assert "\n" not in warning.message


def test_refused_attempt_offered_again_is_not_retrained(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.plan(), fake.plan()])
    fake.overrides["update"].append(refusal("late", "past the deadline", 409))
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert [e[0] for e in fake.events].count("update") == 1
    assert [e[0] for e in fake.events].count("params") == 1
    assert sleeps.delays == [0.5]  # backs off instead of spinning


def test_refused_metrics_abandon_the_round_but_duplicate_does_not(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.plan(1, 1), fake.plan(2, 1)])
    fake.overrides["metrics"].extend([
        refusal("not_invited", "device is not in round 1", 403),
        refusal("duplicate", "already reported", 409),
    ])
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert [e for e in fake.events if e[0] == "update"] == [("update", 2, 1)]


def test_update_without_answer_is_sent_again_not_retrained(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.plan(), fake.plan()])
    fake.overrides["update"].append(TransportError("POST /v1/rounds/1/update: ReadTimeout"))
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert [e[0] for e in fake.events].count("params") == 1
    assert [e[0] for e in fake.events].count("metrics") == 1
    assert sleeps.delays == [0.5]
    (body,) = fake.update_bodies
    assert len(fake.updates) == 1 and body  # the resent body decoded like any other


def test_round_that_moved_on_is_not_trained(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.plan(params_etag='"older"'))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        assert agent.run() == 0
    assert [e[0] for e in fake.events] == ["check-in", "params", "check-in"]
    assert "moved on" in caplog.text


def test_params_that_do_not_fit_the_task_are_refused_locally(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCoordinator([])
    fake.payload = encode_params({"weight": np.zeros((5, 3), np.float32), "bias": np.zeros(3, np.float32)})
    fake.etag = payload_etag(fake.payload)
    fake.checkins.append(fake.plan())
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        assert agent.run() == 0
    assert "shape_mismatch" in caplog.text
    assert sleeps.delays == [0.5]
    assert [e[0] for e in fake.events] == ["check-in", "params", "check-in"]


def test_past_the_deadline_the_update_is_not_sent(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ticks = iter(range(0, 10_000, 10))
    fake = FakeCoordinator([])
    fake.checkins.append(fake.plan(deadline_s=5.0))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake, clock=lambda: float(next(ticks)))
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        assert agent.run() == 0
    assert "update" not in [e[0] for e in fake.events]
    assert "past the deadline" in caplog.text


# ----------------------------------------------------------------- failures


def test_transport_errors_back_off_exponentially_up_to_the_cap(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([TransportError("POST /v1/check-in: ConnectError") for _ in range(4)])
    fake.checkins.append(refusal("internal", "database is locked", 503))
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert sleeps.delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_resets_after_a_success(tmp_path: Path, data_file: Path) -> None:
    down = TransportError("POST /v1/check-in: ConnectError")
    fake = FakeCoordinator([down, down])
    fake.checkins.extend([fake.wait(10.0), down])
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert sleeps.delays == [0.5, 1.0, pytest.approx(11.0), 0.5]


@pytest.mark.parametrize(("code", "status"), [("bad_version", 400), ("unknown_device", 401)])
def test_refused_check_in_is_logged_and_backed_off(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture, code: str, status: int
) -> None:
    fake = FakeCoordinator([refusal(code, "something is off", status) for _ in range(3)])
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        assert agent.run() == 0
    assert sleeps.delays == [0.5, 1.0, 2.0]
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all(code in m and "retrying in" in m for m in errors)


def test_malformed_check_in_reply_is_backed_off(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCoordinator([Response(200, {}, b"<html>proxy</html>"), Response(302, {"location": "/x"})])
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        assert agent.run() == 0
    assert sleeps.delays == [0.5, 1.0]
    assert "unusable check-in reply" in caplog.text and "HTTP 302" in caplog.text


def test_task_failure_ends_the_round_not_the_agent(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "boomtask.py").write_text(textwrap.dedent("""
        from fedge.tasks import LogReg

        class Boom(LogReg):
            def train(self, params, data, config, rng):
                raise RuntimeError("out of memory")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = FakeCoordinator([], info=TaskInfo(name="boomtask:Boom", num_features=4, num_classes=3))
    fake.checkins.extend([fake.plan(), fake.plan()])
    agent, sleeps = make_agent(make_config(tmp_path, data_file), fake)
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        assert agent.run() == 0
    assert "round 1 attempt 1: the task failed: task.train raised RuntimeError: out of memory" in caplog.text
    assert [e[0] for e in fake.events] == ["check-in", "params", "metrics", "check-in", "check-in"]
    assert sleeps.delays == [0.5, 1.0]  # and the same attempt is not trained again


# --------------------------------------------------------------------- stop


def test_stop_during_a_wait_returns_promptly(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.wait(60.0))
    checked_in = threading.Event()
    fake.hooks["check-in"] = checked_in.set
    agent = Agent(make_config(tmp_path, data_file), transport=LocalTransport(fake))
    thread, outcome = run_in_thread(agent)
    assert checked_in.wait(5)
    time.sleep(0.05)  # let it reach the 60 s wait
    started = time.monotonic()
    agent.stop()
    thread.join(5)
    assert not thread.is_alive() and outcome == [0]
    assert time.monotonic() - started < 1.0
    assert fake.events == [("check-in", NUM_EXAMPLES)]


def test_stop_during_training_abandons_the_upload(
    tmp_path: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.plan())
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    fake.hooks["metrics"] = agent.stop  # SIGTERM arrives as training starts
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        assert agent.run() == 0
    assert [e[0] for e in fake.events] == ["check-in", "params", "metrics"]
    assert "abandoned, nothing uploaded" in caplog.text and "stopping" in caplog.text


# ------------------------------------------------------------ startup checks


def test_data_with_wrong_feature_count_is_a_config_error(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([], info=TaskInfo(name="logreg", num_features=5, num_classes=3))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    with pytest.raises(ConfigError, match=r"local\.npz: data has 4 features \(shape \(30, 4\)\).*expects 5"):
        agent.run()


def test_labels_beyond_the_tasks_classes_are_a_config_error(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([], info=TaskInfo(name="logreg", num_features=4, num_classes=2))
    fake.checkins.append(fake.wait(1.0))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    with pytest.raises(ConfigError, match=r"local\.npz: data has label 2.*2 classes"):
        agent.run()


def test_missing_or_malformed_data_is_a_config_error(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    missing = make_config(tmp_path, tmp_path / "absent.npz")
    with pytest.raises(ConfigError, match=r"absent\.npz: no such file"):
        make_agent(missing, fake)[0].run()
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,0\n3,x,1\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: line 2, column 2"):
        make_agent(make_config(tmp_path, bad), fake)[0].run()
    assert fake.events == []


def test_second_agent_on_the_same_state_dir_is_a_config_error(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.wait(60.0))
    checked_in = threading.Event()
    fake.hooks["check-in"] = checked_in.set
    config = make_config(tmp_path, data_file)
    first = Agent(config, transport=LocalTransport(fake))
    thread, outcome = run_in_thread(first)
    try:
        assert checked_in.wait(5)
        with pytest.raises(ConfigError, match="another agent is already running on state_dir"):
            make_agent(config, fake)[0].run()
    finally:
        first.stop()
        thread.join(5)
    assert outcome == [0]
    assert make_agent(config, fake)[0].run() == 0  # the lock went with the first agent


def test_state_dir_that_cannot_be_created_is_a_config_error(tmp_path: Path, data_file: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    fake = FakeCoordinator([])
    with pytest.raises(ConfigError, match=r"state_dir .* cannot be created"):
        make_agent(make_config(tmp_path, data_file, state_dir=blocker / "state"), fake)[0].run()


def test_device_id_is_generated_once_and_reused(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    config = make_config(tmp_path, data_file)
    assert make_agent(config, fake)[0].run() == 0
    kept = (config.state_dir / DEVICE_ID_FILE).read_text().strip()
    assert re.fullmatch(r"dev-[0-9a-f]{12}", kept)
    assert make_agent(config, fake)[0].run() == 0
    assert fake.devices == [kept, kept]
    assert make_agent(make_config(tmp_path, data_file, device_id="gw-1"), fake)[0].run() == 0
    assert fake.devices[-1] == "gw-1"
    assert (config.state_dir / DEVICE_ID_FILE).read_text().strip() == kept


def test_malformed_kept_device_id_is_a_config_error(tmp_path: Path, data_file: Path) -> None:
    config = make_config(tmp_path, data_file)
    config.state_dir.mkdir()
    (config.state_dir / DEVICE_ID_FILE).write_text("not a valid id!\n")
    with pytest.raises(ConfigError, match="malformed device id"):
        make_agent(config, FakeCoordinator([]))[0].run()


# ------------------------------------------------------------------ backoff


def test_backoff_delay_stays_within_its_bounds() -> None:
    rng = random.Random(0)
    for attempt in range(12):
        bound = min(30.0, 0.5 * 2**attempt)
        draws = [backoff_delay(attempt, base_s=0.5, cap_s=30.0, rng=rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in draws)
        assert max(draws) > 0.8 * bound  # the whole interval is used, not just its start
    top = [backoff_delay(k, base_s=0.5, cap_s=30.0, rng=FixedRandom(1.0)) for k in range(8)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_delay(100_000, base_s=0.5, cap_s=30.0, rng=FixedRandom(1.0)) == 30.0


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s", "match"),
    [(-1, 0.5, 30.0, "attempt"), (True, 0.5, 30.0, "attempt"), (0, 0.0, 30.0, "base_s"),
     (0, float("nan"), 30.0, "base_s"), (0, 1.0, 0.5, "cap_s"), (0, 1.0, float("inf"), "cap_s")],
)
def test_backoff_delay_refuses_bad_arguments(attempt: int, base_s: float, cap_s: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        backoff_delay(attempt, base_s=base_s, cap_s=cap_s, rng=random.Random(0))


def test_training_rng_is_stable_and_distinct() -> None:
    draw = training_rng("gw-1", 3, 1).integers(1 << 62)
    assert draw == training_rng("gw-1", 3, 1).integers(1 << 62)
    variants = (("gw-2", 3, 1), ("gw-1", 4, 1), ("gw-1", 3, 2))
    others = {training_rng(*args).integers(1 << 62) for args in variants}
    assert draw not in others and len(others) == 3


# ------------------------------------------------------------------- config


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_config_file_with_every_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
        coordinator = "https://coord.example:8443/fedge/"
        data = "data/local.npz"
        state_dir = "/var/lib/fedge"
        device_id = "gateway-07"
        backoff_base_s = 1
        backoff_cap_s = 60.0
        request_timeout_s = 10.0
        max_payload_bytes = 1048576
        log_level = "DEBUG"
    """)
    config = load_agent_config(path, {})
    assert config == AgentConfig(
        coordinator="https://coord.example:8443/fedge", data=tmp_path / "data" / "local.npz",
        state_dir=Path("/var/lib/fedge"), device_id="gateway-07", backoff_base_s=1.0,
        backoff_cap_s=60.0, request_timeout_s=10.0, max_payload_bytes=1 << 20, log_level="debug",
    )
    assert isinstance(config.backoff_base_s, float)


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
        coordinator = "http://10.0.0.2:8080"
        insecure = true
        data = "d.csv"
        state_dir = "state"
        backoff_cap_s = 5.0
    """)
    config = load_agent_config(path, {"state-dir": "elsewhere", "device_id": None, "log_level": "warning"})
    assert config.state_dir == Path("elsewhere")  # a flag's relative path is the working directory's
    assert config.data == tmp_path / "d.csv"
    assert (config.device_id, config.backoff_base_s, config.backoff_cap_s) == (None, 0.5, 5.0)
    assert config.request_timeout_s == 60.0 and config.max_payload_bytes == 256 << 20
    assert config.log_level == "warning"
    bare = load_agent_config(None, {"coordinator": "https://c", "data": Path("d.npz"), "state_dir": "s"})
    assert (bare.coordinator, bare.data, bare.state_dir) == ("https://c", Path("d.npz"), Path("s"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('coordinator = "https://c"\ndata = [', "agent.toml: not valid TOML"),
        ('coordinater = "https://c"', "agent.toml: unknown key 'coordinater'; did you mean 'coordinator'?"),
        ('coordinator = "https://me:secret@c"', "key 'coordinator' must not hold credentials"),
        ('coordinator = "https://c"\ndata = "d.npz"\nstate_dir = "s"\n[extra]\nx = 1', "unknown key 'extra'"),
        ('coordinator = "ftp://c"', "agent.toml: key 'coordinator' must be an http:// or https:// URL"),
        ('coordinator = "https://"', "key 'coordinator' must name a host"),
        ('coordinator = "https://c:99999"', "key 'coordinator' is not a valid URL"),
        ('coordinator = "https://c?a=1"', "must not hold a query"),
        ("coordinator = 5", "key 'coordinator' must be a URL string, got 5"),
        ('backoff_base_s = "fast"',
         "agent.toml: key 'backoff_base_s' must be a number of seconds, got 'fast'"),
        ("backoff_base_s = true", "key 'backoff_base_s' must be a number of seconds"),
        ("request_timeout_s = -1", "key 'request_timeout_s' must be a positive finite number"),
        ("request_timeout_s = inf", "key 'request_timeout_s' must be a positive finite number"),
        ("max_payload_bytes = 1e6", "key 'max_payload_bytes' must be an integer"),
        ("max_payload_bytes = 0", "key 'max_payload_bytes' must be at least 1"),
        ('device_id = "no spaces"', "key 'device_id' must be 1 to 64 letters"),
        ('log_level = "chatty"', "key 'log_level' must be one of debug, info"),
        ("data = 3", "key 'data' must be a path"),
        ('coordinator = "https://c"\nstate_dir = "s"',
         "agent.toml: missing required key 'data' (or give --data)"),
        ('coordinator = "https://c"\ndata = "d.npz"\nstate_dir = "s"\nbackoff_base_s = 40.0',
         "agent.toml: key 'backoff_base_s': backoff_cap_s (30.0) must be at least backoff_base_s (40.0)"),
    ],
)
def test_bad_config_files_are_refused_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path, {})
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_config_files_and_bad_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file"):
        load_agent_config(tmp_path / "nope.toml", {})
    with pytest.raises(ConfigError, match="is a directory"):
        load_agent_config(tmp_path, {})
    (tmp_path / "latin1.toml").write_bytes(b'data = "\xe9"')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid TOML"):
        load_agent_config(tmp_path / "latin1.toml", {})
    full = {"coordinator": "https://c", "data": "d.npz", "state_dir": "s"}
    with pytest.raises(ConfigError, match=r"^--coordinator must be an http:// or https:// URL, got 'c\.ex"):
        load_agent_config(None, {**full, "coordinator": "c.example"})
    with pytest.raises(ConfigError, match="unknown override 'colour'"):
        load_agent_config(None, {**full, "colour": "red"})
    with pytest.raises(ConfigError, match="missing required setting 'state_dir': give --state-dir"):
        load_agent_config(None, {"coordinator": "https://c", "data": "d.npz"})
    with pytest.raises(ConfigError, match=r"AgentConfig\.coordinator must be an http"):
        AgentConfig(coordinator="unix:///run/x", data=Path("d"), state_dir=Path("s"))
    with pytest.raises(ConfigError, match=r"AgentConfig\.backoff_cap_s"):
        AgentConfig(coordinator="https://c", data=Path("d"), state_dir=Path("s"), backoff_cap_s=0.1)


# ------------------------------------------------------------- the process


BANNED = ("torch", "fastapi", "starlette", "uvicorn", "matplotlib", "rich", "sklearn")


def test_agent_import_graph_stays_small() -> None:
    code = (
        "import sys; import fedge.agent, fedge.agent.loop, fedge.transport.http; "
        f"bad=[m for m in {BANNED!r} if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_agent_retries_an_unreachable_coordinator_and_stops_on_sigterm(
    tmp_path: Path, data_file: Path
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        from fedge.agent import load_agent_config, run_agent
        config = load_agent_config(None, {{
            "coordinator": "http://127.0.0.1:{port}", "data": {str(data_file)!r},
            "state_dir": {str(tmp_path / "state")!r}, "backoff_base_s": 20.0, "insecure": True,
        }})
        status = run_agent(config)
        # rich is left out: httpx's __init__ imports its optional CLI when rich is installed.
        bad = [m for m in {BANNED[:-2] + BANNED[-1:]!r} if m in sys.modules]
        assert not bad, bad
        sys.exit(status)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: queue.Queue[str] = queue.Queue()
    stderr = proc.stderr
    assert stderr is not None

    def read() -> None:
        for line in stderr:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not any("coordinator unreachable" in line for line in seen):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        stderr.close()
    while not lines.empty():
        seen.append(lines.get())
    unreachable = next(line for line in seen if "coordinator unreachable" in line)
    assert unreachable.startswith("WARNING ") and "ConnectError" in unreachable
    assert re.search(r"retrying in \d+\.\d s", unreachable)
    assert any("plain HTTP" in line for line in seen)
    assert any(line.startswith("INFO stopping") for line in seen)


def test_plain_http_needs_insecure_and_https_refuses_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain HTTP: pass --insecure"):
        load_agent_config(None, {"coordinator": "http://c", "data": "d.npz", "state_dir": "s"})
    with pytest.raises(ConfigError, match="http:// coordinators only"):
        load_agent_config(
            None, {"coordinator": "https://c", "data": "d.npz", "state_dir": "s", "insecure": True}
        )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ca_fingerprint", "abc", "64 hex digits"),
        ("token", "", "non-empty"),
        ("insecure", "yes", "true or false"),
    ],
)
def test_bad_tls_settings_are_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_agent_config(None, {"coordinator": "https://c", "data": "d.npz", "state_dir": "s", key: value})


def test_token_and_token_file_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_agent_config(None, {"coordinator": "https://c", "data": "d.npz", "state_dir": "s", "token": "t",
                                 "token_file": "t.txt"})


# ------------------------------------------------------------ policy and limits


def test_check_in_carries_the_policy_verdict_readings_and_profile(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    config = make_config(tmp_path, data_file, policy=parse_policy({"min_memory_mb": 1e9}))
    agent, _ = make_agent(config, fake)
    assert agent.run() == 0
    (hello,) = fake.hellos
    assert hello.ready is False
    assert hello.profile["policy"].startswith("memory available")  # type: ignore[union-attr]
    assert hello.profile["arch"] and int(hello.profile["cores"]) >= 1
    assert float(hello.profile["agent_rss_mb"]) > 10 and "memory_available_mb" in hello.profile


def test_an_allowed_device_says_so_and_measures_its_throughput(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.wait(1.0)])
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    first, second = fake.hellos
    assert first.ready is True and first.profile["policy"] == "ok"
    # The task is known after the first reply; its benchmark runs once and is cached.
    assert "examples_per_s" not in first.profile and float(second.profile["examples_per_s"]) > 0
    assert (tmp_path / "state" / "profile.json").exists()


def test_training_stopped_by_a_limit_is_reported_not_a_silent_dropout(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "slowtask.py").write_text(textwrap.dedent("""
        import time
        from fedge.tasks import LogReg

        class Slow(LogReg):
            def train(self, params, data, config, rng):
                time.sleep(30)
                return super().train(params, data, config, rng)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = FakeCoordinator([], info=TaskInfo(name="slowtask:Slow", num_features=4, num_classes=3))
    fake.checkins.append(fake.plan(evaluate=False))
    config = make_config(tmp_path, data_file, limits=parse_limits({"max_train_s": 1, "check_every_s": 0.1}))
    agent, _ = make_agent(config, fake)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        assert agent.run() == 0
    assert time.monotonic() - t0 < 20
    (abort,) = fake.aborts
    assert (abort.round, abort.attempt) == (1, 1)
    assert abort.reasons == ["training took more than max_train_s 1 s"]
    assert not fake.updates
    assert "round 1 attempt 1: training stopped: training took more than max_train_s 1 s" in caplog.text


def test_the_daily_cap_counts_uploaded_rounds(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.extend([fake.plan(1), fake.plan(2)])
    config = make_config(tmp_path, data_file, policy=parse_policy({"max_rounds_per_day": 2}))
    agent, _ = make_agent(config, fake)
    assert agent.run() == 0
    assert len(fake.updates) == 2
    assert [h.ready for h in fake.hellos] == [True, True, False]
    assert "2 rounds today reached max_rounds_per_day 2" in str(fake.hellos[-1].profile["policy"])


@pytest.mark.parametrize(("table", "message"), [
    ({"policy": {"min_battery_percent": -5}}, "key 'policy' min_battery_percent must be between 0 and 100"),
    ({"policy": {"windows": ["08:00-25:00"]}}, "window '08:00-25:00' is not HH:MM-HH:MM"),
    ({"policy": {"battery": 5}}, "key 'policy' unknown key 'battery'"),
    ({"limits": {"nice": 40}}, "key 'limits' nice must be an integer between 0 and 19"),
    ({"limits": "fast"}, "key 'limits' must be a table"),
])
def test_bad_policy_and_limits_in_the_config_file_are_refused(
    tmp_path: Path, table: dict[str, object], message: str
) -> None:
    lines = ['coordinator = "http://c.test"', "insecure = true", 'data = "d.npz"', 'state_dir = "s"']
    for name, value in table.items():
        if isinstance(value, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.insert(0, f"{name} = {json.dumps(value)}")
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_agent_config(path, {})

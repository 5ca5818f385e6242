"""Secure aggregation's wire messages, the masked-vector frame, and the agent's session refusing bad input.

The agent's :class:`~fedge.agent.secagg.SecureSession` is driven here against
a scripted coordinator on the real transport seam, with a clock that moves
only when the session sleeps, so deadlines, retries and stops are exact.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from fedge.agent.client import CoordinatorClient
from fedge.agent.secagg import SecureSession, SessionStopped, encode_for_secagg
from fedge.encoding.fixedpoint import FixedPoint
from fedge.errors import ConfigError, ProtocolError, TransportError
from fedge.transport import LocalTransport, Request, Response
from fedge.wire import (
    SecAggPlan,
    TrainPlan,
    decode_masked,
    encode_masked,
    parse_message,
    secagg_setup_id,
)

COHORT = ["a", "b", "c", "d"]


def plan_fields(**secagg: object) -> dict[str, object]:
    grid = FixedPoint(clip=1.0, bits=16, max_weight=50, cohort_size=len(COHORT))
    values: dict[str, object] = dict(
        cohort=COHORT, k=3, threshold=2, graph_seed=bytes(range(32)), vector_length=16, clip=1.0, bits=16,
        max_weight=50, wire_bits=grid.wire_bits, advertise_deadline_s=10.0, share_deadline_s=20.0,
        unmask_deadline_s=70.0, poll_s=0.5,
    )
    values.update(secagg)
    return values


def train_plan(**secagg: object) -> TrainPlan:
    return TrainPlan(round=3, attempt=2, params_etag='"x"', deadline_s=60.0, local_epochs=1, batch_size=8,
                     lr=0.1, secagg=SecAggPlan.model_validate(plan_fields(**secagg)))


# ------------------------------------------------------------------ messages


def test_the_setup_id_binds_round_and_attempt() -> None:
    ids = {secagg_setup_id(r, a) for r in (1, 2, 3) for a in (1, 2, 3)}
    assert len(ids) == 9 and secagg_setup_id(3, 2) == (3 << 32) | 2


@pytest.mark.parametrize(("change", "match"), [
    ({"cohort": ["a", "b"]}, "at least 3"),
    ({"cohort": ["a", "b", "c d"]}, "pattern"),
    ({"graph_seed": bytes(31)}, "at least 32"),
    ({"bits": 40}, "less than or equal to 32"),
    ({"clip": math.inf}, "finite"),
    ({"poll_s": 0}, "greater than 0"),
    ({"extra": 1}, "Extra inputs"),
])
def test_a_secagg_plan_out_of_range_is_refused(change: dict[str, object], match: str) -> None:
    body = json.loads(SecAggPlan.model_validate(plan_fields()).model_dump_json())
    body.update({k: (base64.b64encode(v).decode() if isinstance(v, bytes) else v) for k, v in change.items()})
    with pytest.raises(ValidationError, match=match):
        SecAggPlan.model_validate_json(json.dumps(body))


def test_a_plan_round_trips_through_json_with_its_seed_in_base64() -> None:
    plan = train_plan()
    text = plan.model_dump_json()
    assert bytes(range(32)) not in text.encode()
    again = parse_message(TrainPlan, text)
    assert again == plan and again.secagg is not None and again.secagg.graph_seed == bytes(range(32))


def test_the_masked_frame_round_trips_and_refuses_what_an_encoder_never_makes() -> None:
    frame = encode_masked(bytes(range(10)), round=4, attempt=2, length=4, bits=20, train_s=1.5)
    got = decode_masked(frame, length=4, bits=20)
    assert (got.round, got.attempt, got.length, got.bits, got.train_s, got.packed) == (
        4, 2, 4, 20, 1.5, bytes(range(10)))
    assert len(frame) == 25 + 10
    with pytest.raises(ValueError, match="do not hold"):
        encode_masked(bytes(9), round=4, attempt=2, length=4, bits=20, train_s=0.0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="train_s"):
            encode_masked(bytes(10), round=4, attempt=2, length=4, bits=20, train_s=bad)
    for body, code in ((b"", "bad_payload"), (b"FSM", "bad_payload"), (b"XYZ" + frame[3:], "bad_payload"),
                       (frame[:3] + b"\x02" + frame[4:], "bad_version"), (frame + b"\x00", "wrong_length")):
        with pytest.raises(ProtocolError) as e:
            decode_masked(body, length=4, bits=20)
        assert e.value.reason == code
    with pytest.raises(ProtocolError, match="wrong_length"):
        decode_masked(frame, length=5, bits=20)


# ------------------------------------------------------------------ the agent's session


class Script:
    """A coordinator that answers from a table of (method, step) -> response or error; records calls."""

    def __init__(self, answers: dict[tuple[str, str], Callable[[Request], Response]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    def __call__(self, req: Request) -> Response:
        step = req.path.split("?")[0].rsplit("/", 1)[1]
        self.calls.append((req.method, step))
        return self.answers[(req.method, step)](req)


def json_reply(body: dict[str, object]) -> Callable[[Request], Response]:
    return lambda req: Response(200, {"content-type": "application/json"}, json.dumps(body).encode())


ACK = json_reply({"protocol": 1, "round": 3, "attempt": 2})
NOT_READY = json_reply({"protocol": 1, "round": 3, "attempt": 2, "ready": False, "retry_s": 0.5})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def session(script: Script, plan: TrainPlan, clock: Clock, *, device: str = "a",
            stopping: Callable[[], bool] = lambda: False) -> SecureSession:
    client = CoordinatorClient(LocalTransport(script), device_id=device, timeout_s=5.0)
    return SecureSession(client, plan, device, received_at=clock.now, clock=clock, sleep=clock.sleep,
                         stopping=stopping, backoff=lambda n: 0.5 * 2**n)


@pytest.mark.parametrize(("plan", "match"), [
    (lambda: train_plan(wire_bits=12), "needs"),
    (lambda: train_plan(threshold=4), "threshold"),  # more than the 3 neighbours
    (lambda: train_plan(k=5), "k must"),  # more neighbours than the cohort has
    (lambda: train_plan(bits=32), "wrap"),
    (lambda: train_plan(cohort=["a", "a", "b"]), "distinct"),
])
def test_a_session_refuses_a_setup_no_honest_coordinator_sends(
    plan: Callable[[], TrainPlan], match: str
) -> None:
    script = Script({})
    with pytest.raises(ProtocolError, match=match) as e:
        session(script, plan(), Clock())
    assert e.value.reason == "bad_plan" and not script.calls  # nothing was sent


def test_a_session_refuses_a_cohort_without_this_device_and_a_plan_without_secagg() -> None:
    with pytest.raises(ProtocolError) as e:
        session(Script({}), train_plan(), Clock(), device="stranger")
    assert e.value.reason == "not_invited"
    plain = train_plan().model_copy(update={"secagg": None})
    with pytest.raises(ProtocolError, match="no secure-aggregation setup"):
        session(Script({}), plain, Clock())


def test_a_phase_that_never_closes_is_given_up_after_its_deadline() -> None:
    clock = Clock()
    script = Script({("POST", "keys"): ACK, ("GET", "keys"): NOT_READY})
    with pytest.raises(ProtocolError) as e:
        session(script, train_plan(), clock).exchange_keys()
    assert e.value.reason == "secagg_timeout"
    # Asked every retry_s (0.5 s) until the deadline (10 s) and its grace (5 s), no longer.
    assert 100.0 + 10.0 + 5.0 <= clock.now <= 100.0 + 16.0
    assert script.calls.count(("GET", "keys")) == pytest.approx(30, abs=2)


def test_network_errors_are_retried_with_backoff_until_the_deadline() -> None:
    clock = Clock()

    def down(req: Request) -> Response:
        raise TransportError("connection refused")

    script = Script({("POST", "keys"): down})
    with pytest.raises(TransportError):
        session(script, train_plan(), clock).exchange_keys()
    assert clock.slept[:3] == [0.5, 1.0, 2.0]  # exponential (the test's backoff has no jitter)
    assert clock.now <= 100.0 + 10.0 + 5.0  # never past the phase's deadline and its grace


def test_a_stopping_agent_ends_the_session_and_sends_nothing_more() -> None:
    clock = Clock()
    script = Script({("POST", "keys"): ACK, ("GET", "keys"): NOT_READY})
    s = session(script, train_plan(), clock, stopping=lambda: len(clock.slept) >= 1)
    with pytest.raises(SessionStopped):
        s.exchange_keys()
    assert script.calls == [("POST", "keys"), ("GET", "keys")]


def test_a_refusal_ends_the_session() -> None:
    body = json.dumps({"error": "not_invited", "detail": "device 'a' is not in round 3"}).encode()
    script = Script({("POST", "keys"): lambda req: Response(403, {"content-type": "application/json"}, body)})
    with pytest.raises(ProtocolError) as e:
        session(script, train_plan(), Clock()).exchange_keys()
    assert e.value.reason == "not_invited" and script.calls == [("POST", "keys")]


def test_the_weight_is_the_example_count_capped_at_the_grid_bound_or_one(
    caplog: pytest.LogCaptureFixture
) -> None:
    s = session(Script({}), train_plan(), Clock())
    assert s.weight(30) == 30
    with caplog.at_level(logging.WARNING, logger="fedge.agent.secagg"):
        assert s.weight(500) == 50
    assert "more than the round's weight bound 50" in caplog.text
    unweighted = session(Script({}), train_plan(weighted=False, max_weight=1,
                                                wire_bits=FixedPoint(1.0, 16, 1, 4).wire_bits), Clock())
    assert unweighted.weight(500) == 1


def test_encode_for_secagg_puts_the_update_on_the_grid_with_its_weight_last() -> None:
    grid = FixedPoint(clip=0.5, bits=12, max_weight=10, cohort_size=4)
    delta = {"w": np.array([[0.25, -0.5], [2.0, 0.0]], np.float32), "b": np.array([-3.0], np.float32)}
    v = encode_for_secagg(delta, weight=10, grid=grid, rng=np.random.default_rng(0))
    assert v.dtype == np.uint32 and v.size == 6 and v[-1] == 10
    values = v[:-1].view(np.int32).astype(np.float64) * grid.step
    np.testing.assert_allclose(values, [0.25, -0.5, 0.5, 0.0, -0.5], atol=grid.step)  # clipped to 0.5
    with pytest.raises(ConfigError, match="weight"):
        encode_for_secagg(delta, weight=11, grid=grid, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="non-finite"):
        encode_for_secagg({"b": np.array([np.nan])}, weight=1, grid=grid, rng=np.random.default_rng(0))


def test_encode_for_secagg_with_a_noise_share_clips_rounds_and_noises_like_the_simulator() -> None:
    grid = FixedPoint(clip=0.5, bits=16, max_weight=1, cohort_size=50, noise_stddev=0.01)
    steps = grid.noise_steps
    zero = {"w": np.zeros(4000, np.float32)}
    # Fifty devices with nothing to say: their sum is the noise alone, of stddev sqrt(50) shares.
    total = np.zeros(4001, np.uint32)
    for seed in range(50):
        np.add(total, encode_for_secagg(zero, weight=1, grid=grid, rng=np.random.default_rng(seed),
                                        clip_norm=1.0), out=total)
    assert int(total[-1]) == 50  # every update weighs 1
    noise = total[:-1].view(np.int32).astype(np.float64)
    assert abs(noise.mean()) < 0.1 * steps * math.sqrt(50)
    assert noise.std() == pytest.approx(steps * math.sqrt(50), rel=0.05)
    # The L2 clip scales the update to norm 1 (each value 1/sqrt(4000)) before the noise is added.
    big = {"w": np.full(4000, 0.4, np.float32)}
    v = encode_for_secagg(big, weight=1, grid=grid, rng=np.random.default_rng(0), clip_norm=1.0)
    values = v[:-1].view(np.int32).astype(np.float64) * grid.step
    assert values.mean() == pytest.approx(1 / math.sqrt(4000), rel=0.05)
    assert (values - 1 / math.sqrt(4000)).std() == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ConfigError, match="clip_norm"):
        encode_for_secagg(zero, weight=1, grid=grid, rng=np.random.default_rng(0))
    weighted = FixedPoint(clip=0.5, bits=16, max_weight=5, cohort_size=50, noise_stddev=0.01)
    with pytest.raises(ConfigError, match="max_weight must be 1"):
        encode_for_secagg(zero, weight=1, grid=weighted, rng=np.random.default_rng(0), clip_norm=1.0)


def test_a_plan_with_a_noise_share_needs_a_clip_norm_and_a_matching_grid() -> None:
    grid = FixedPoint(clip=1.0, bits=16, max_weight=1, cohort_size=len(COHORT), noise_stddev=0.05)
    fields = dict(max_weight=1, weighted=False, noise_stddev=0.05, min_survivors=3)
    with pytest.raises(ValidationError, match="noise_stddev needs clip_norm"):
        train_plan(wire_bits=grid.wire_bits, **fields)
    plan = TrainPlan.model_validate({**json.loads(train_plan().model_dump_json()), "clip_norm": 1.0,
                                     "secagg": {**json.loads(train_plan().secagg.model_dump_json()),  # type: ignore[union-attr]
                                                "wire_bits": grid.wire_bits, **fields}})
    s = session(Script({}), plan, Clock())
    assert s.grid.noise_stddev == 0.05 and s.grid.wire_bits == grid.wire_bits
    # The noise widens the sum: a plan sending the noiseless grid's bits is refused.
    stale = plan.model_copy(update={"secagg": plan.secagg.model_copy(  # type: ignore[union-attr]
        update={"wire_bits": FixedPoint(clip=1.0, bits=16, max_weight=1, cohort_size=3).wire_bits})})
    with pytest.raises(ProtocolError, match="needs") as e:
        session(Script({}), stale, Clock())
    assert e.value.reason == "bad_plan"
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        SecAggPlan.model_validate(plan_fields(min_survivors=-1))


def test_an_idle_agent_does_not_load_secure_aggregation() -> None:
    import subprocess
    import sys

    code = ("import sys; import fedge.agent, fedge.agent.loop, fedge.agent.client, fedge.wire; "
            "bad = [m for m in sys.modules if m.startswith(('fedge.secagg', 'fedge.agent.secagg')) "
            "or m.endswith(('.x25519', '.aead', '.hkdf'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

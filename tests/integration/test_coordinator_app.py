"""The coordinator app in-process: rounds over the real HTTP routes, every refusal, resume."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard
from fastapi.testclient import TestClient

from fedge import params as P
from fedge.coordinator.app import create_app
from fedge.coordinator.config import CoordinatorConfig, load_coordinator_config
from fedge.coordinator.service import Coordinator
from fedge.errors import ConfigError
from fedge.wire import DEVICE_HEADER, decode_params, encode_params, encode_update


class Clock:
    """A settable wall clock, so deadlines pass when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def make_config(tmp_path: Path, **overrides: object) -> CoordinatorConfig:
    values: dict[str, object] = dict(
        task="logreg",
        num_features=4,
        num_classes=3,
        rounds=2,
        cohort_size=3,
        min_updates=2,
        min_devices=3,
        deadline_s=30.0,
        wait_s=0.2,
        data_dir=str(tmp_path / "store"),
        seed=0,
    )
    values.update(overrides)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Fleet:
    """A client plus the coordinator behind it."""

    def __init__(self, client: TestClient, coordinator: Coordinator, clock: Clock) -> None:
        self.client = client
        self.coordinator = coordinator
        self.clock = clock

    def check_in(self, device: str, num_examples: int = 10) -> dict[str, object]:
        r = self.client.post(
            "/v1/check-in",
            json={"protocol": 1, "num_examples": num_examples},
            headers={DEVICE_HEADER: device},
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def plan(self, device: str) -> dict[str, object]:
        """Check in until the device is invited."""
        for _ in range(200):
            reply = self.check_in(device)
            if reply["action"] == "train":
                return reply["plan"]  # type: ignore[return-value]
            time.sleep(0.01)
        raise AssertionError(f"{device} was never invited")

    def params(self, round_id: int, device: str) -> tuple[P.Params, str]:
        r = self.client.get(f"/v1/rounds/{round_id}/params", headers={DEVICE_HEADER: device})
        assert r.status_code == 200, r.text
        params, _ = decode_params(r.content, spec=None, max_bytes=1 << 24)
        return params, r.headers["etag"]

    def upload(self, device: str, body: bytes, round_id: int) -> tuple[int, dict[str, str]]:
        r = self.client.post(
            f"/v1/rounds/{round_id}/update",
            content=body,
            headers={DEVICE_HEADER: device, "content-type": "application/octet-stream"},
        )
        return r.status_code, r.json()


@pytest.fixture
def fleet(tmp_path: Path, clock: Clock) -> Iterator[Fleet]:
    coordinator = Coordinator(make_config(tmp_path), clock=clock)
    with TestClient(create_app(coordinator)) as client:
        yield Fleet(client, coordinator, clock)
    coordinator.close()


def delta_like(params: P.Params, value: float = 0.01) -> P.Params:
    return {k: np.full_like(v, value) for k, v in params.items()}


def test_a_round_runs_over_http_and_is_checkpointed(fleet: Fleet, tmp_path: Path) -> None:
    assert fleet.check_in("a")["action"] == "wait"
    fleet.check_in("b")
    fleet.check_in("c")
    plans = {d: fleet.plan(d) for d in "abc"}
    assert {p["round"] for p in plans.values()} == {1}
    params, etag = fleet.params(1, "a")
    assert etag == plans["a"]["params_etag"]
    r = fleet.client.get("/v1/rounds/1/params", headers={DEVICE_HEADER: "a", "If-None-Match": etag})
    assert r.status_code == 304
    report = {"protocol": 1, "round": 1, "attempt": 1, "num_examples": 10, "metrics": {"accuracy": 0.5}}
    assert (
        fleet.client.post("/v1/rounds/1/metrics", json=report, headers={DEVICE_HEADER: "a"}).status_code
        == 200
    )
    for i, d in enumerate("abc"):
        body = encode_update(
            delta_like(params, 0.1 * (i + 1)),
            round=1,
            attempt=1,
            num_examples=10 * (i + 1),
            metrics={"train_loss": 1.0},
        )
        assert fleet.upload(d, body, 1)[0] == 200
    wait_until(lambda: fleet.coordinator.state.round == 1)
    # The example-weighted mean of 0.1, 0.2, 0.3 with weights 10, 20, 30.
    expected = (0.1 * 10 + 0.2 * 20 + 0.3 * 30) / 60
    for name, value in fleet.coordinator.state.params.items():
        np.testing.assert_allclose(value, params[name] + expected, rtol=1e-5)
    status = fleet.client.get("/v1/status").json()
    assert status["rounds_complete"] == 1
    assert status["history"][0]["device_accuracy"] == pytest.approx(0.5)
    assert (tmp_path / "store" / "checkpoints" / "round-000001.safetensors").exists()


def test_done_after_the_last_round(tmp_path: Path, clock: Clock) -> None:
    coordinator = Coordinator(
        make_config(tmp_path, rounds=1, cohort_size=1, min_updates=1, min_devices=1), clock=clock
    )
    with TestClient(create_app(coordinator)) as client:
        fleet = Fleet(client, coordinator, clock)
        plan = fleet.plan("a")
        params, _ = fleet.params(1, "a")
        body = encode_update(delta_like(params), round=1, attempt=1, num_examples=5)
        assert fleet.upload("a", body, 1)[0] == 200
        wait_until(lambda: coordinator.done)
        assert fleet.check_in("a")["action"] == "done"
        assert plan["deadline_s"] == pytest.approx(30.0)
    coordinator.close()


def _refusal(response_status: int, body: dict[str, str], code: str, status: int) -> None:
    assert (response_status, body["error"]) == (status, code), body
    assert body["detail"]


def test_every_refusal_is_a_4xx_with_a_code_and_the_round_still_completes(fleet: Fleet) -> None:
    c = fleet.client
    # Identity and JSON.
    r = c.post("/v1/check-in", json={"protocol": 1, "num_examples": 1})
    _refusal(r.status_code, r.json(), "unknown_device", 401)
    r = c.post("/v1/check-in", json={"protocol": 1, "num_examples": 1}, headers={DEVICE_HEADER: "../etc"})
    _refusal(r.status_code, r.json(), "unknown_device", 401)
    r = c.post("/v1/check-in", content=b"{not json", headers={DEVICE_HEADER: "a"})
    _refusal(r.status_code, r.json(), "bad_request", 400)
    r = c.post("/v1/check-in", json={"protocol": 99, "num_examples": 1}, headers={DEVICE_HEADER: "a"})
    _refusal(r.status_code, r.json(), "bad_version", 400)
    r = c.post(
        "/v1/check-in", json={"protocol": 1, "num_examples": 1, "evil": 1}, headers={DEVICE_HEADER: "a"}
    )
    _refusal(r.status_code, r.json(), "bad_request", 400)
    r = c.post("/v1/check-in", content=b"x" * 70_000, headers={DEVICE_HEADER: "a"})
    _refusal(r.status_code, r.json(), "too_large", 413)
    r = c.get("/v1/rounds/abc/params", headers={DEVICE_HEADER: "a"})
    _refusal(r.status_code, r.json(), "bad_request", 400)
    r = c.get("/v1/rounds/7/params", headers={DEVICE_HEADER: "a"})
    _refusal(r.status_code, r.json(), "unknown_round", 404)

    for d in "abcd":
        fleet.check_in(d)
    invited = [d for d in "abcd" if fleet.check_in(d)["action"] == "train"]
    wait_until(lambda: fleet.coordinator.open is not None)
    invited = sorted(fleet.coordinator.open.round.cohort)  # type: ignore[union-attr, arg-type]
    outsider = next(d for d in "abcd" if d not in invited)
    a, b, last = invited
    params, _ = fleet.params(1, a)
    good = encode_update(delta_like(params), round=1, attempt=1, num_examples=4)

    _refusal(*fleet.upload(a, b"definitely not zstd", 1), "bad_payload", 400)
    _refusal(*fleet.upload(a, zstandard.ZstdCompressor().compress(b"\x00" * 64), 1), "bad_payload", 400)
    wrong_shape = {k: np.zeros((*v.shape[:-1], v.shape[-1] + 1), v.dtype) for k, v in params.items()}
    _refusal(
        *fleet.upload(a, encode_update(wrong_shape, round=1, attempt=1, num_examples=4), 1),
        "shape_mismatch",
        422,
    )
    missing = dict(list(params.items())[:1])
    _refusal(
        *fleet.upload(a, encode_update(missing, round=1, attempt=1, num_examples=4), 1), "shape_mismatch", 422
    )
    wrong_dtype = {k: v.astype(np.float64) for k, v in params.items()}
    _refusal(
        *fleet.upload(a, encode_update(wrong_dtype, round=1, attempt=1, num_examples=4), 1),
        "shape_mismatch",
        422,
    )
    nan = {k: np.full_like(v, np.nan) for k, v in params.items()}
    _refusal(*fleet.upload(a, encode_update(nan, round=1, attempt=1, num_examples=4), 1), "non_finite", 422)
    _refusal(
        *fleet.upload(a, encode_update(delta_like(params), round=1, attempt=1, num_examples=0), 1),
        "bad_weight",
        422,
    )
    _refusal(
        *fleet.upload(
            a,
            encode_update(
                delta_like(params), round=1, attempt=1, num_examples=4, metrics={"loss": float("inf")}
            ),
            1,
        ),
        "non_finite",
        422,
    )
    _refusal(*fleet.upload(a, encode_params(params), 1), "bad_payload", 400)
    _refusal(*fleet.upload(a, good, 2), "unknown_round", 404)
    _refusal(
        *fleet.upload(a, encode_update(delta_like(params), round=2, attempt=1, num_examples=4), 1),
        "bad_payload",
        400,
    )
    _refusal(
        *fleet.upload(a, encode_update(delta_like(params), round=1, attempt=9, num_examples=4), 1),
        "closed",
        409,
    )
    _refusal(*fleet.upload(outsider, good, 1), "not_invited", 403)
    r = c.post(
        "/v1/rounds/1/update", content=good, headers={DEVICE_HEADER: a, "content-length": str(300 << 20)}
    )
    _refusal(r.status_code, r.json(), "too_large", 413)
    # A zstd bomb: small on the wire, far larger than the round's params once inflated.
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (8 << 20))
    _refusal(*fleet.upload(a, bomb, 1), "too_large", 413)

    assert fleet.upload(a, good, 1)[0] == 200
    _refusal(*fleet.upload(a, good, 1), "duplicate", 409)
    report = {
        "protocol": 1,
        "round": 1,
        "attempt": 1,
        "num_examples": 4,
        "metrics": {"accuracy": float("nan")},
    }
    r = c.post(
        "/v1/rounds/1/metrics",
        content=json.dumps(report).replace('"accuracy": NaN', '"accuracy": NaN'),
        headers={DEVICE_HEADER: b},
    )
    _refusal(r.status_code, r.json(), "non_finite", 422)
    # Late: past the deadline, the update is refused even though the round is still open.
    assert fleet.upload(b, good, 1)[0] == 200
    fleet.clock.now += 31
    _refusal(*fleet.upload(last, good, 1), "late", 409)
    wait_until(lambda: fleet.coordinator.state.round == 1)
    _refusal(*fleet.upload(last, good, 1), "closed", 409)

    counts = fleet.coordinator.store.refusal_counts()
    for code in (
        "unknown_device",
        "bad_request",
        "bad_version",
        "too_large",
        "unknown_round",
        "bad_payload",
        "shape_mismatch",
        "non_finite",
        "bad_weight",
        "closed",
        "not_invited",
        "duplicate",
        "late",
    ):
        assert counts.get(code, 0) >= 1, code
    metrics = c.get("/metrics/").text
    assert 'fedge_refusals_total{code="shape_mismatch"} 3.0' in metrics


def test_a_round_short_of_its_minimum_is_abandoned_and_retried_with_a_fresh_cohort(fleet: Fleet) -> None:
    for d in "abcdef":
        fleet.check_in(d)
    wait_until(lambda: fleet.coordinator.open is not None)
    first = fleet.coordinator.open
    assert first is not None
    a = sorted(first.round.cohort)[0]
    params, _ = fleet.params(1, str(a))
    assert (
        fleet.upload(str(a), encode_update(delta_like(params), round=1, attempt=1, num_examples=3), 1)[0]
        == 200
    )
    fleet.clock.now += 31  # the deadline passes with 1 of the 2 needed
    for d in "abcdef":  # keep every device available
        fleet.check_in(d)
    wait_until(lambda: fleet.coordinator.open is not None and fleet.coordinator.open.attempt == 2)
    rows = fleet.coordinator.store.rounds()
    assert [(r.round, r.attempt, r.state) for r in rows] == [(1, 1, "abandoned"), (1, 2, "open")]
    assert set(rows[0].dropped) == set(first.round.cohort) - {a}
    # The retry prefers the devices that did not drop out.
    assert not set(rows[1].cohort) & set(rows[0].dropped)
    assert fleet.coordinator.state.round == 0


def test_a_restarted_coordinator_resumes_after_the_last_complete_round(tmp_path: Path, clock: Clock) -> None:
    config = make_config(tmp_path, rounds=3, cohort_size=1, min_updates=1, min_devices=1)
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        fleet = Fleet(client, coordinator, clock)
        fleet.plan("a")
        params, _ = fleet.params(1, "a")
        assert (
            fleet.upload("a", encode_update(delta_like(params), round=1, attempt=1, num_examples=3), 1)[0]
            == 200
        )
        wait_until(lambda: coordinator.state.round == 1)
        fleet.plan("a")  # round 2 is open when the coordinator goes away
        saved = P.copy(coordinator.state.params)
    coordinator.close()

    again = Coordinator(config, clock=clock)
    try:
        assert again.state.round == 1
        for name, value in saved.items():
            np.testing.assert_array_equal(again.state.params[name], value)
        rows = again.store.rounds()
        assert [(r.round, r.attempt, r.state) for r in rows] == [(1, 1, "complete"), (2, 1, "interrupted")]
        with TestClient(create_app(again)) as client:
            fleet = Fleet(client, again, clock)
            plan = fleet.plan("a")
            assert (plan["round"], plan["attempt"]) == (2, 2)
    finally:
        again.close()


def test_a_data_dir_of_another_task_is_refused(tmp_path: Path, clock: Clock) -> None:
    Coordinator(make_config(tmp_path), clock=clock).close()
    with pytest.raises(Exception, match="run"):
        Coordinator(make_config(tmp_path, num_features=5), clock=clock)


def test_the_openapi_schema_is_served(fleet: Fleet) -> None:
    schema = fleet.client.get("/openapi.json").json()
    assert {
        "/v1/check-in",
        "/v1/rounds/{round}/params",
        "/v1/rounds/{round}/update",
        "/v1/rounds/{round}/metrics",
        "/v1/status",
    } <= set(schema["paths"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[task\nname=1", "not valid TOML"),
        ("[tasks]\nname='logreg'", "unknown table"),
        ("[task]\nnam='logreg'", "unknown key task.nam"),
        ("[task]\nnum_features='x'\nnum_classes=3", "num_features must be int"),
        ("[task]\nname='logreg'", "num_features and task.num_classes are required"),
        ("[task]\nnum_features=4\nnum_classes=3\n[rounds]\ncohort_size=2\nmin_updates=3", "cannot exceed"),
        ("[task]\nnum_features=4\nnum_classes=3\n[rounds]\ndeadline_s=-1", "deadline_s must be a positive"),
        ("[task]\nnum_features=4\nnum_classes=3\n[rounds]\nover_selection=0.5", "over_selection"),
        ("[task]\nnum_features=4\nnum_classes=3\n[server]\nport=70000", "port"),
        ("task = 3", "must be a table"),
        ("[task]\nnum_features=4\nnum_classes=3\n[rounds]\nselection='fastest'",
         "rounds.selection must be one of"),
        ("[task]\nnum_features=4\nnum_classes=3\n[rounds]\nfairness=1.5", "rounds.fairness must be between"),
    ],
)
def test_bad_coordinator_configs_are_refused(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_coordinator_config(path)


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_coordinator_config(tmp_path / "nope.toml")


def test_relative_paths_in_the_config_are_relative_to_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "coordinator.toml"
    path.parent.mkdir()
    path.write_text("[task]\nnum_features=4\nnum_classes=3\n[server]\ndata_dir='state'\n")
    assert load_coordinator_config(path).data_dir == str(tmp_path / "conf" / "state")


def test_an_aggregate_that_overflows_is_abandoned_not_applied(tmp_path: Path, clock: Clock) -> None:
    config = make_config(tmp_path, rounds=1, cohort_size=2, min_updates=2, min_devices=2)
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        fleet = Fleet(client, coordinator, clock)
        fleet.check_in("a")
        fleet.plan("b")
        params, _ = fleet.params(1, "a")
        before = P.copy(coordinator.state.params)
        huge = {k: np.full_like(v, 3e38) for k, v in params.items()}  # finite, but the sum is not
        for d in "ab":
            assert fleet.upload(d, encode_update(huge, round=1, attempt=1, num_examples=1), 1)[0] == 200
        wait_until(lambda: any(r.state == "abandoned" for r in coordinator.store.rounds()))
        assert coordinator.state.round == 0
        for name, value in before.items():
            np.testing.assert_array_equal(coordinator.state.params[name], value)
    coordinator.close()


def test_a_failing_round_driver_is_reported_to_the_server(tmp_path: Path, clock: Clock) -> None:
    config = make_config(tmp_path, rounds=1, cohort_size=1, min_updates=1, min_devices=1)
    coordinator = Coordinator(config, clock=clock)
    crashes: list[BaseException] = []

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    coordinator.store.complete_round = broken  # type: ignore[method-assign]
    with TestClient(create_app(coordinator, on_crash=crashes.append)) as client:
        fleet = Fleet(client, coordinator, clock)
        fleet.plan("a")
        params, _ = fleet.params(1, "a")
        body = encode_update(delta_like(params), round=1, attempt=1, num_examples=1)
        assert fleet.upload("a", body, 1)[0] == 200
        wait_until(lambda: bool(crashes))
    assert isinstance(crashes[0], OSError)
    coordinator.close()


def test_a_refusal_is_stored_with_its_round(fleet: Fleet) -> None:
    r = fleet.client.post("/v1/rounds/3/update", content=b"x", headers={DEVICE_HEADER: "a"})
    assert r.status_code == 404
    r = fleet.client.post("/v1/rounds/x/update", content=b"x", headers={DEVICE_HEADER: "a"})
    assert r.status_code == 400
    rows = fleet.coordinator.store._query("SELECT code, round FROM refusals ORDER BY rowid")
    assert [tuple(row) for row in rows] == [("unknown_round", 3), ("bad_request", None)]


def test_a_device_that_stops_training_is_counted_out_and_the_round_closes_without_waiting(
    fleet: Fleet,
) -> None:
    for d in "abc":
        fleet.check_in(d)
    plans = {d: fleet.plan(d) for d in "abc"}
    params, _ = fleet.params(1, "a")
    for d in "ab":
        body = encode_update(delta_like(params), round=1, attempt=1, num_examples=5)
        assert fleet.upload(d, body, 1)[0] == 200
    assert fleet.coordinator.state.round == 0  # c is still expected
    abort = {"protocol": 1, "round": 1, "attempt": plans["c"]["attempt"], "reasons": ["not on AC power"]}
    r = fleet.client.post("/v1/rounds/1/abort", json=abort, headers={DEVICE_HEADER: "c"})
    assert r.status_code == 200, r.text
    # No clock advance: the round closes because every invited device has answered.
    wait_until(lambda: fleet.coordinator.state.round == 1)
    (row,) = [x for x in fleet.coordinator.store.rounds() if x.round == 1]
    assert list(row.dropped) == ["c"] and sorted(row.reported) == ["a", "b"]
    # A second abort, an abort after an upload, and malformed reports are refused.
    for device, body, code in [
        ("c", abort, "closed"),
        ("zzz", {**abort, "round": 1}, "closed"),
        ("c", {**abort, "round": 7}, "unknown_round"),
        ("c", {"protocol": 1, "round": 1, "attempt": 1, "reasons": []}, "bad_request"),
        ("c", {"protocol": 1, "round": 1, "attempt": 1, "reasons": ["x" * 201]}, "bad_request"),
    ]:
        round_id = body["round"]
        r = fleet.client.post(f"/v1/rounds/{round_id}/abort", json=body, headers={DEVICE_HEADER: device})
        assert r.status_code in (400, 404, 409, 410, 422) and r.json()["error"] == code, (code, r.text)


def test_an_abort_from_a_device_that_already_reported_is_a_duplicate(fleet: Fleet) -> None:
    for d in "abc":
        fleet.check_in(d)
    plans = {d: fleet.plan(d) for d in "abc"}
    params, _ = fleet.params(1, "a")
    body = encode_update(delta_like(params), round=1, attempt=1, num_examples=5)
    assert fleet.upload("a", body, 1)[0] == 200
    abort = {"protocol": 1, "round": 1, "attempt": plans["a"]["attempt"], "reasons": ["too hot"]}
    r = fleet.client.post("/v1/rounds/1/abort", json=abort, headers={DEVICE_HEADER: "a"})
    assert r.status_code == 409 and r.json()["error"] == "duplicate"


def test_deadline_selection_leaves_out_devices_that_cannot_finish(tmp_path: Path, clock: Clock) -> None:
    config = make_config(tmp_path, selection="deadline", cohort_size=3, min_updates=2, min_devices=4,
                         deadline_s=30.0)
    coordinator = Coordinator(config, clock=clock)
    speeds = {"fast-1": 1000.0, "fast-2": 800.0, "fast-3": 500.0, "slow": 0.5}  # examples per second
    with TestClient(create_app(coordinator)) as client:
        for device, rate in speeds.items():
            hello = {"protocol": 1, "num_examples": 100, "profile": {"examples_per_s": rate}}
            r = client.post("/v1/check-in", json=hello, headers={DEVICE_HEADER: device})
            assert r.status_code == 200
        wait_until(lambda: coordinator.open is not None)
        assert coordinator.open is not None
        # 100 examples at 0.5/s is 200 s: past the 30 s deadline, so not invited.
        assert sorted(coordinator.open.round.cohort) == ["fast-1", "fast-2", "fast-3"]
        assert coordinator.estimate_round_s("slow") == pytest.approx(200.0)
    coordinator.close()


def _event(i: int = 0, **over: object) -> dict[str, object]:
    return {"at": 1000.0 + i, "kind": "warning", "level": "warning", "message": f"event {i}", **over}


def test_device_events_are_stored_rate_limited_and_listed(fleet: Fleet) -> None:
    def send(device: str, events: list[dict[str, object]]) -> tuple[int, dict[str, object]]:
        r = fleet.client.post("/v1/events", json={"protocol": 1, "events": events},
                              headers={DEVICE_HEADER: device})
        return r.status_code, r.json()

    assert send("a", [_event(i) for i in range(100)]) == (200, {"protocol": 1, "stored": 100})
    assert send("a", [_event(i) for i in range(100)])[0] == 200  # the burst allows 200
    status, body = send("a", [_event(0)])
    assert (status, body["error"]) == (429, "rate_limited")
    fleet.clock.now += 30  # half a minute refills 60
    assert send("a", [_event(i) for i in range(60)])[0] == 200
    assert send("b", [_event(7, kind="policy", level="info", fields={"cpu_load": 0.9})])[0] == 200
    rows = fleet.client.get("/v1/admin/events", params={"device": "b"}).json()
    assert [(r["device"], r["kind"], r["fields"]) for r in rows] == [("b", "policy", {"cpu_load": 0.9})]
    assert len(fleet.client.get("/v1/admin/events", params={"limit": 5}).json()) == 5
    later = fleet.client.get("/v1/admin/events", params={"since": fleet.clock.now - 1}).json()
    assert len(later) == 61
    assert fleet.client.get("/v1/admin/events", params={"limit": 0}).status_code == 400


@pytest.mark.parametrize(("events", "why"), [
    ([], "no events"),
    ([_event(i) for i in range(101)], "too many"),
    ([_event(kind="gossip")], "unknown kind"),
    ([_event(level="fatal")], "unknown level"),
    ([_event(message="")], "empty message"),
    ([_event(message="x" * 501)], "long message"),
    ([_event(at=-1.0)], "negative time"),
    ([_event(fields={f"k{i}": i for i in range(17)})], "too many fields"),
    ([_event(fields={"nested": {"a": 1}})], "nested field"),
    ([_event(extra="x")], "unknown key"),
])
def test_malformed_event_batches_are_refused(fleet: Fleet, events: list[dict[str, object]], why: str) -> None:
    r = fleet.client.post("/v1/events", json={"protocol": 1, "events": events}, headers={DEVICE_HEADER: "a"})
    assert r.status_code == 400 and r.json()["error"] == "bad_request", why


def test_metrics_report_rounds_updates_devices_and_events(fleet: Fleet) -> None:
    for d in "abc":
        fleet.check_in(d)
    fleet.plan("a")
    params, _ = fleet.params(1, "a")
    for d in "abc":
        fleet.plan(d)
        body = encode_update(delta_like(params), round=1, attempt=1, num_examples=5)
        assert fleet.upload(d, body, 1)[0] == 200
    wait_until(lambda: fleet.coordinator.state.round == 1)
    batch = {"protocol": 1, "events": [{"at": 1.0, "kind": "policy", "message": "policy: training allowed"}]}
    assert fleet.client.post("/v1/events", json=batch, headers={DEVICE_HEADER: "a"}).status_code == 200
    text = fleet.client.get("/metrics/").text
    for line in ('fedge_rounds_total{state="complete"} 1.0', "fedge_rounds_complete 1.0",
                 "fedge_rounds_target 2.0", "fedge_updates_received_total 3.0",
                 "fedge_device_events_total 1.0", 'fedge_round_phase_seconds_total{phase="selection"}',
                 "fedge_received_bytes_total", "fedge_sent_bytes_total",
                 'fedge_devices{state="known"} 3.0', 'fedge_devices{state="online"} 3.0',
                 "fedge_round_duration_seconds_count 1.0"):
        assert line in text, line


def test_dashboard_page_assets_and_data(fleet: Fleet) -> None:
    for d in "abc":
        profile = {"policy": "ok", "fedge_version": "0.1.0", "cpu_load": 0.2}
        hello = {"protocol": 1, "num_examples": 10, "profile": profile}
        fleet.client.post("/v1/check-in", json=hello, headers={DEVICE_HEADER: d})
    page = fleet.client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/dashboard/dashboard.js"' in page.text
    assert "http" not in page.text.split("<body>")[1]  # no CDN, nothing fetched from elsewhere
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        r = fleet.client.get(f"/dashboard/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    for bad in ("dashboard.html", "secret.txt", "..%2f..%2fstore%2ffedge.db"):
        assert fleet.client.get(f"/dashboard/{bad}").status_code == 404
    data = fleet.client.get("/v1/admin/dashboard").json()
    assert {d["device"] for d in data["fleet"]} == {"a", "b", "c"}
    a = next(d for d in data["fleet"] if d["device"] == "a")
    assert a["policy"] == "ok" and a["version"] == "0.1.0" and a["readings"] == {"cpu_load": 0.2}
    assert a["online"] and set(data) >= {"state", "rounds", "privacy", "events", "refusals", "open"}


def test_the_grafana_dashboard_queries_metrics_fedge_exports(fleet: Fleet) -> None:
    import json
    import re

    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "fedge.json").read_text())
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", fleet.client.get("/metrics/").text, flags=re.M))
    names = {n for n, _ in exported} | {f"{n}_total" for n, kind in exported if kind == "counter"} | \
        {f"{n}_bucket" for n, kind in exported if kind == "histogram"}
    agent_side = {"fedge_agent_cpu_load", "fedge_agent_policy_ok"}  # from the agents' textfiles
    queried = {m for p in dashboard["panels"] for t in p["targets"]
               for m in re.findall(r"\bfedge_\w+", t["expr"])}
    # Privacy and open-round gauges exist only with DP, or while a round is open.
    conditional = {"fedge_privacy_epsilon", "fedge_privacy_budget", "fedge_round_invited",
                   "fedge_round_reported"}
    assert queried - names - agent_side - conditional == set()


def test_rounds_are_profiled_by_phase_and_fedge_rounds_prints_them(fleet: Fleet, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    for d in "abc":
        fleet.check_in(d)
    for d in "abc":
        fleet.plan(d)
    params, _ = fleet.params(1, "a")
    for i, d in enumerate("abc"):
        fleet.params(1, d)
        body = encode_update(delta_like(params), round=1, attempt=1, num_examples=10 * (i + 1),
                             metrics={"train_s": 0.5})
        assert fleet.upload(d, body, 1)[0] == 200
    wait_until(lambda: fleet.coordinator.state.round == 1)
    (row,) = [r for r in fleet.coordinator.store.rounds() if r.round == 1]
    for phase in ("selection", "download", "training", "upload", "decode", "aggregation", "store"):
        assert row.metrics[f"phase_{phase}_s"] >= 0, phase
    assert row.metrics["phase_training_s"] == 0.5

    def rounds(*args: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; from fedge.cli import main; sys.exit(main())"
        argv = [sys.executable, "-c", code, "rounds", "--data-dir", str(tmp_path / "store"), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    listing = rounds()
    assert listing.returncode == 0, listing.stderr
    assert "selectio" in listing.stdout.splitlines()[0] and "complete" in listing.stdout
    shown = json.loads(rounds("show", "1", "--json").stdout)
    (attempt,) = shown
    assert {d["device"]: d["examples_per_s"] for d in attempt["devices"]} == {"a": 20.0, "b": 40.0, "c": 60.0}
    assert rounds("show", "9").returncode == 2 and "no round 9" in rounds("show", "9").stderr
    assert rounds("show").returncode == 2

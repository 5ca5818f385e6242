"""A coordinator and agent processes on 127.0.0.1: training, a coordinator crash, dropouts, refusals.

Everything here is real: ``fedge coordinator`` and ``fedge agent`` processes
talking HTTP, a SQLite store on disk, SIGKILL. Progress is read from
``/v1/status`` and from the store, never guessed from sleeps.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import zstandard
from fedge_processes import (
    CoordinatorHandle,
    DigitsFiles,
    Proc,
    Processes,
    coordinator_config,
    free_port,
    start_coordinator,
)

from fedge.store import Store
from fedge.wire import DEVICE_HEADER, REFUSALS, SECAGG_REFUSALS, decode_params, encode_params, encode_update

_AGENT_EXIT_S = 30.0


def _open_with_report(status: dict[str, Any]) -> bool:
    return status["open"] is not None and status["open"]["reported"] >= 1


def _finish(coordinator: CoordinatorHandle, agents: list[Proc], procs: Processes) -> None:
    """The coordinator (``--exit-when-done``) and every agent exit 0 on their own, agents saying so."""
    code = coordinator.proc.wait(_AGENT_EXIT_S, context=f" after training ended\n{procs.logs()}")
    assert code == 0, procs.logs()
    assert "Traceback" not in coordinator.proc.text(), procs.logs()
    for agent in agents:
        code = agent.wait(_AGENT_EXIT_S, context=f" after training ended\n{procs.logs()}")
        assert code == 0, procs.logs()
        assert "training is over" in agent.text(), procs.logs()
        assert "Traceback" not in agent.text(), procs.logs()


def test_five_agents_train_five_rounds_and_the_model_improves(
    tmp_path: Path, procs: Processes, http: httpx.Client, digits: Callable[[int], DigitsFiles]
) -> None:
    data = digits(5)
    port = free_port()
    config = coordinator_config(
        tmp_path / "coordinator.toml",
        eval_data=data.test,
        data_dir=tmp_path / "store",
        port=port,
        rounds=5,
        cohort_size=5,
        deadline_s=30.0,
    )
    coordinator = start_coordinator(procs, http, config, port, "--exit-when-done")
    agents = [procs.agent(f"agent-{i}", coordinator.url, path) for i, path in enumerate(data.devices)]

    status = coordinator.wait_for("5 rounds complete", lambda s: s["state"] == "done", timeout_s=60)

    history = status["history"]
    assert status["rounds_complete"] == 5
    assert [(h["round"], h["state"], h["reported"]) for h in history] == [
        (r, "complete", 5) for r in range(1, 6)
    ]
    accuracy = [h["accuracy"] for h in history]
    assert accuracy[-1] > accuracy[0], accuracy
    assert accuracy[-1] > 0.8, accuracy
    _finish(coordinator, agents, procs)
    for r in range(1, 6):
        assert (tmp_path / "store" / "checkpoints" / f"round-{r:06d}.safetensors").is_file()


def test_a_coordinator_killed_mid_round_resumes_and_the_agents_come_back_by_themselves(
    tmp_path: Path, procs: Processes, http: httpx.Client, digits: Callable[[int], DigitsFiles]
) -> None:
    data = digits(5)
    port = free_port()
    store_dir = tmp_path / "store"
    # min_devices = 5: after the restart a round opens only once every agent is back,
    # so every agent is still checking in when the coordinator says "done".
    config = coordinator_config(
        tmp_path / "coordinator.toml",
        eval_data=data.test,
        data_dir=store_dir,
        port=port,
        rounds=5,
        cohort_size=5,
        min_updates=4,
        min_devices=5,
        deadline_s=3.0,
    )
    coordinator = start_coordinator(procs, http, config, port)
    agents = [procs.agent(f"agent-{i}", coordinator.url, path) for i, path in enumerate(data.devices)]
    coordinator.wait_for("round 1 complete", lambda s: s["rounds_complete"] >= 1)
    # A frozen agent holds the next round it is invited to open until the deadline,
    # with the others' updates in: a window wide enough to kill the coordinator mid-round.
    laggard = agents[-1]
    laggard.send(signal.SIGSTOP)
    try:
        status = coordinator.wait_for("round 2 or 3 open with an update in", _open_with_report, timeout_s=20)
        coordinator.proc.send(signal.SIGKILL)
        assert coordinator.proc.wait(10) == -signal.SIGKILL
    finally:
        laggard.send(signal.SIGCONT)
    killed_round = status["open"]["round"]
    assert killed_round in (2, 3), status
    with Store(store_dir) as store:
        (row,) = [r for r in store.rounds() if r.state == "open"]
        assert (row.round, row.attempt) == (killed_round, 1)
        assert store.updates(killed_round, 1), "no update was recorded before the kill"

    coordinator = start_coordinator(procs, http, config, port, "--exit-when-done", name="coordinator-2")
    status = coordinator.wait_for(
        "training done after the restart", lambda s: s["state"] == "done", timeout_s=60
    )
    assert [
        (h["round"], h["attempt"], h["state"]) for h in status["history"] if h["round"] == killed_round
    ] == [
        (killed_round, 1, "interrupted"),
        (killed_round, 2, "complete"),
    ], status

    _finish(coordinator, agents, procs)
    assert f"resuming after round {killed_round - 1}" in coordinator.proc.text()
    with Store(store_dir) as store:
        rows = store.rounds()
        updates = {
            (r.round, r.attempt): {str(u["device_id"]) for u in store.updates(r.round, r.attempt)}
            for r in rows
        }
    complete = [r.round for r in rows if r.state == "complete"]
    assert complete == [1, 2, 3, 4, 5], rows  # every round exactly once, none twice
    assert [(r.round, r.attempt) for r in rows if r.state == "interrupted"] == [(killed_round, 1)], rows
    assert {r.state for r in rows} == {"complete", "interrupted"}, rows
    assert [(r.attempt, r.state) for r in rows if r.round == killed_round] == [
        (1, "interrupted"),
        (2, "complete"),
    ]
    for r in range(1, 6):
        assert (store_dir / "checkpoints" / f"round-{r:06d}.safetensors").is_file()
    # Every agent, never restarted, found the new coordinator and trained for it.
    after = set().union(
        *(ids for (rnd, attempt), ids in updates.items() if (rnd, attempt) > (killed_round, 1))
    )
    assert after == {a.name for a in agents}, (updates, procs.logs())


def test_agents_killed_mid_round_are_dropped_and_the_round_completes_without_them(
    tmp_path: Path, procs: Processes, http: httpx.Client, digits: Callable[[int], DigitsFiles]
) -> None:
    data = digits(6)
    port = free_port()
    store_dir = tmp_path / "store"
    config = coordinator_config(
        tmp_path / "coordinator.toml",
        eval_data=data.test,
        data_dir=store_dir,
        port=port,
        rounds=4,
        cohort_size=6,
        min_updates=3,
        deadline_s=6.0,
    )
    coordinator = start_coordinator(procs, http, config, port, "--exit-when-done")
    agents = [procs.agent(f"agent-{i}", coordinator.url, path) for i, path in enumerate(data.devices)]
    victims: list[Proc] = []

    def two_invited_not_reported(s: dict[str, Any]) -> bool:
        rnd = s["open"]
        if rnd is None or rnd["round"] < 2 or rnd["invited"] != 6:
            return False
        with Store(store_dir) as store:
            reported = {u["device_id"] for u in store.updates(rnd["round"], rnd["attempt"])}
        victims[:] = [a for a in agents if a.name not in reported][:2]
        return len(victims) == 2

    status = coordinator.wait_for(
        "round 2 open, all six invited, two yet to report", two_invited_not_reported
    )
    for v in victims:
        v.send(signal.SIGKILL)
    for v in victims:
        assert v.wait(10) == -signal.SIGKILL
    survivors = [a for a in agents if a not in victims]

    coordinator.wait_for("training done", lambda s: s["state"] == "done", timeout_s=60)
    _finish(coordinator, survivors, procs)
    with Store(store_dir) as store:
        rows = store.rounds()
    killed = {v.name for v in victims}
    # The round they were invited to and never reported to: the one open at the kill,
    # or, had one of them uploaded in the instant between the look and the kill, the
    # next (they are still counted available for 10 s after their last check-in).
    hit = [r for r in rows if killed <= set(r.cohort) and not killed & set(r.reported)]
    assert hit, rows
    first = hit[0]
    assert (first.round, first.attempt) in (
        (status["open"]["round"], status["open"]["attempt"]),
        (status["open"]["round"] + 1, 1),
    ), rows
    assert first.state == "complete", rows
    assert set(first.reported) == {s.name for s in survivors}, rows
    assert set(first.dropped) == killed and len(first.dropped) == 2, rows
    assert [(r.round, r.state) for r in rows] == [(r, "complete") for r in range(1, 5)], rows


# ------------------------------------------------------------------- refusals


class Probe:
    """A scripted device: sends what it is told over HTTP and checks the refusal that comes back."""

    def __init__(self, client: httpx.Client, url: str, sent: Counter[str]) -> None:
        self.client = client
        self.url = url
        self.sent = sent

    def check_in(self, device: str) -> dict[str, Any]:
        r = self.client.post(
            f"{self.url}/v1/check-in",
            json={"protocol": 1, "num_examples": 50},
            headers={DEVICE_HEADER: device},
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def invite(self, devices: list[str], coordinator: CoordinatorHandle) -> dict[str, dict[str, Any]]:
        """Check ``devices`` in until each holds a train plan for the same round."""
        plans: dict[str, dict[str, Any]] = {}

        def invited(_: dict[str, Any]) -> bool:
            for d in devices:
                reply = self.check_in(d)
                if reply["action"] == "train":
                    plans[d] = reply["plan"]
            return len(plans) == len(devices) and len({p["round"] for p in plans.values()}) == 1

        coordinator.wait_for(f"{devices} invited", invited)
        return plans

    def params(self, round_id: int, device: str) -> dict[str, np.ndarray]:
        r = self.client.get(f"{self.url}/v1/rounds/{round_id}/params", headers={DEVICE_HEADER: device})
        assert r.status_code == 200, r.text
        params, _ = decode_params(r.content, spec=None, max_bytes=1 << 24)
        return params

    def upload(self, device: str, round_id: int, body: Any, **headers: str) -> httpx.Response:
        return self.client.post(
            f"{self.url}/v1/rounds/{round_id}/update",
            content=body,
            headers={DEVICE_HEADER: device, "content-type": "application/octet-stream", **headers},
        )

    def refused(self, code: str, response: httpx.Response) -> None:
        """``response`` is the refusal ``code``: its status and the JSON error body."""
        assert response.status_code == REFUSALS[code], (code, response.status_code, response.text)
        body = response.json()
        assert set(body) == {"error", "detail"}, body
        assert body["error"] == code, (code, body)
        assert isinstance(body["detail"], str) and body["detail"], body
        self.sent[code] += 1

    def ok(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.text


def test_every_refusal_over_http_leaves_the_coordinator_and_the_rounds_running(
    tmp_path: Path,
    procs: Processes,
    http: httpx.Client,
    digits: Callable[[int], DigitsFiles],
) -> None:
    sent: Counter[str] = Counter()
    data = digits(2)
    port = free_port()
    store_dir = tmp_path / "store"
    # Two real agents and two scripted devices, all four in every cohort; a round closes
    # only when all four reported, so the scripted devices decide when it ends.
    limit = 50_000
    config = coordinator_config(
        tmp_path / "coordinator.toml",
        eval_data=data.test,
        data_dir=store_dir,
        port=port,
        rounds=2,
        cohort_size=4,
        min_devices=4,
        deadline_s=60.0,
        max_body_mb=limit / 2**20,
    )
    coordinator = start_coordinator(procs, http, config, port, "--exit-when-done")
    probe = Probe(http, coordinator.url, sent)
    c, url = http, coordinator.url
    a, b = "probe-a", "probe-b"
    probe.check_in(a)
    probe.check_in(b)
    agents = [procs.agent(f"agent-{i}", url, path) for i, path in enumerate(data.devices)]

    # Device events: a burst past the rate (200) is refused whole; the rounds go on.
    event = {"at": 1.0, "kind": "warning", "message": "probe"}
    for _ in range(2):
        probe.ok(c.post(f"{url}/v1/events", json={"protocol": 1, "events": [event] * 100},
                        headers={DEVICE_HEADER: b}))
    probe.refused("rate_limited", c.post(f"{url}/v1/events", json={"protocol": 1, "events": [event]},
                                         headers={DEVICE_HEADER: b}))

    # Before any round: identity and JSON.
    probe.refused("unknown_device", c.post(f"{url}/v1/check-in", json={"protocol": 1, "num_examples": 1}))
    probe.refused(
        "unknown_device",
        c.post(
            f"{url}/v1/check-in", json={"protocol": 1, "num_examples": 1}, headers={DEVICE_HEADER: "../x"}
        ),
    )
    probe.refused("unknown_device", c.get(f"{url}/v1/rounds/1/params"))
    probe.refused(
        "bad_request", c.post(f"{url}/v1/check-in", content=b"{not json", headers={DEVICE_HEADER: a})
    )
    probe.refused(
        "bad_request",
        c.post(
            f"{url}/v1/check-in",
            json={"protocol": 1, "num_examples": 1, "evil": 1},
            headers={DEVICE_HEADER: a},
        ),
    )
    probe.refused(
        "bad_request",
        c.post(f"{url}/v1/check-in", json={"protocol": 1, "num_examples": -1}, headers={DEVICE_HEADER: a}),
    )
    probe.refused("bad_request", c.get(f"{url}/v1/rounds/abc/params", headers={DEVICE_HEADER: a}))
    probe.refused(
        "bad_version",
        c.post(f"{url}/v1/check-in", json={"protocol": 99, "num_examples": 1}, headers={DEVICE_HEADER: a}),
    )
    probe.refused(
        "too_large", c.post(f"{url}/v1/check-in", content=b" " * 70_000, headers={DEVICE_HEADER: a})
    )
    probe.refused("unknown_round", c.get(f"{url}/v1/rounds/7/params", headers={DEVICE_HEADER: a}))

    plans = probe.invite([a, b], coordinator)
    r1, attempt = plans[a]["round"], plans[a]["attempt"]
    assert r1 == 1
    params = probe.params(r1, a)

    def update(delta: dict[str, np.ndarray], **kw: Any) -> bytes:
        fields: dict[str, Any] = {"round": r1, "attempt": attempt, "num_examples": 20, **kw}
        return encode_update(delta, **fields)

    small = {k: np.full_like(v, 1e-3) for k, v in params.items()}
    good = update(small, metrics={"train_loss": 1.0})
    # Payloads that are not updates of this round's params.
    probe.refused("bad_payload", probe.upload(a, r1, b"definitely not zstd"))
    probe.refused("bad_payload", probe.upload(a, r1, zstandard.ZstdCompressor().compress(b"\x00" * 64)))
    probe.refused("bad_payload", probe.upload(a, r1, encode_params(small)))  # params, not an update
    probe.refused("bad_payload", probe.upload(a, r1, update(small, round=r1 + 1)))
    meta = {
        "fedge.protocol": "2",
        "fedge.kind": "update",
        "fedge.round": str(r1),
        "fedge.attempt": str(attempt),
        "fedge.num_examples": "20",
    }
    probe.refused("bad_version", probe.upload(a, r1, encode_params(small, meta)))
    wider = {k: np.zeros((*v.shape[:-1], v.shape[-1] + 1), v.dtype) for k, v in params.items()}
    probe.refused("shape_mismatch", probe.upload(a, r1, update(wider)))
    probe.refused("shape_mismatch", probe.upload(a, r1, update(dict(list(small.items())[:1]))))
    probe.refused(
        "shape_mismatch", probe.upload(a, r1, update({k: v.astype(np.float64) for k, v in small.items()}))
    )
    probe.refused(
        "non_finite", probe.upload(a, r1, update({k: np.full_like(v, np.nan) for k, v in small.items()}))
    )
    probe.refused("non_finite", probe.upload(a, r1, update(small, metrics={"train_loss": float("inf")})))
    probe.refused("bad_weight", probe.upload(a, r1, update(small, num_examples=0)))
    probe.refused("bad_weight", probe.upload(a, r1, update(small, num_examples=-3)))
    # Too large: declared by Content-Length, streamed without one, and a zstd bomb
    # (a few hundred bytes that inflate to 8 MiB).
    probe.refused("too_large", probe.upload(a, r1, b"\x00" * (limit + 10_000)))
    probe.refused("too_large", probe.upload(a, r1, iter([b"\x00" * 8192] * 8)))
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (8 << 20))
    assert len(bomb) < limit
    probe.refused("too_large", probe.upload(a, r1, bomb))
    # Right payload, wrong place or time.
    probe.refused("not_invited", probe.upload("outsider", r1, good))
    probe.refused("closed", probe.upload(a, r1, update(small, attempt=attempt + 5)))
    probe.refused("unknown_round", probe.upload(a, r1 + 5, good))
    report = {
        "protocol": 1,
        "round": r1,
        "attempt": attempt,
        "num_examples": 20,
        "metrics": {"accuracy": 0.5},
    }
    metrics_url = f"{url}/v1/rounds/{r1}/metrics"
    probe.refused(
        "non_finite",
        c.post(
            metrics_url,
            content=b'{"protocol": 1, "round": %d, "attempt": %d, "num_examples": 20, '
            b'"metrics": {"accuracy": NaN}}' % (r1, attempt),
            headers={DEVICE_HEADER: a},
        ),
    )
    probe.ok(c.post(metrics_url, json=report, headers={DEVICE_HEADER: a}))
    probe.refused("duplicate", c.post(metrics_url, json=report, headers={DEVICE_HEADER: a}))
    probe.ok(probe.upload(a, r1, good))
    probe.refused("duplicate", probe.upload(a, r1, good))  # probe-b has not reported: still open
    assert coordinator.proc.alive(), procs.logs()
    status = coordinator.status()
    assert status is not None and status["open"]["round"] == r1 and status["rounds_complete"] == 0, status
    probe.check_in(a)  # stays available for round 2
    probe.ok(probe.upload(b, r1, good))
    coordinator.wait_for("round 1 complete", lambda s: s["rounds_complete"] >= 1)

    plans = probe.invite([a, b], coordinator)
    r2 = plans[a]["round"]
    assert r2 == 2
    probe.refused("closed", probe.upload(a, r1, good))  # an update for an earlier round
    params = probe.params(r2, a)
    counts = _prometheus_refusals(c.get(f"{url}/metrics/").text)
    status = coordinator.status()
    assert status is not None
    for d in (a, b):
        body = encode_update(
            {k: np.zeros_like(v) for k, v in params.items()},
            round=r2,
            attempt=plans[d]["attempt"],
            num_examples=20,
        )
        probe.ok(probe.upload(d, r2, body))
    status_after = coordinator.wait_for("training done", lambda s: s["state"] == "done")

    _finish(coordinator, agents, procs)
    assert counts == dict(sent), (counts, sent)
    assert status["refusals"] == dict(sent), status
    assert status_after["refusals"] == dict(sent), status_after
    with Store(store_dir) as store:
        assert store.refusal_counts() == dict(sent)
        rows = store.rounds()
    assert [(r.round, r.state, len(r.reported)) for r in rows] == [(1, "complete", 4), (2, "complete", 4)], (
        rows
    )
    # "late" needs a deadline to pass mid-request (the in-process tests cover it); the identity
    # refusals (certificates, tokens, CSRs, admin) are sent over mutual TLS in test_tls.py, and
    # secure aggregation's in tests/integration/test_secagg_coordinator.py and test_secagg.py.
    identity = {"no_certificate", "unauthorized", "revoked", "bad_token", "bad_csr", "device_exists"}
    assert set(sent) == set(REFUSALS) - {"late"} - identity - set(SECAGG_REFUSALS)


def _prometheus_refusals(text: str) -> dict[str, int]:
    found = re.findall(r'^fedge_refusals_total\{code="([a-z_]+)"\} ([0-9.e+]+)$', text, flags=re.M)
    return {code: int(float(n)) for code, n in found if float(n) > 0}

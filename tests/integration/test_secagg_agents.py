"""Real agents run secure rounds against the real coordinator app, in-process.

Each agent is a :class:`~fedge.agent.Agent` on a
:class:`~fedge.transport.local.LocalTransport` that forwards to the app, so
the agent's SecAgg+ steps, the coordinator's routes and both state machines
are the production code; only the socket is missing. A forwarding handler can
also play a misbehaving network or a dishonest coordinator: lose a reply, or
alter the unmask request one agent receives.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fedge.agent import Agent, AgentConfig
from fedge.cli import main
from fedge.coordinator.app import create_app
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.secagg import SecureRound
from fedge.coordinator.service import Coordinator
from fedge.errors import TransportError
from fedge.transport import LocalTransport, Request, Response
from fedge.wire import DEVICE_HEADER

Handler = Callable[[Request], Response]


def config(tmp_path: Path, name: str, **overrides: object) -> CoordinatorConfig:
    values: dict[str, object] = dict(
        task="logreg", num_features=4, num_classes=3, rounds=3, cohort_size=5, min_updates=4, min_devices=5,
        deadline_s=30.0, wait_s=0.05, data_dir=str(tmp_path / name), seed=0,
    )
    values.update(overrides)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


def forward(client: TestClient) -> Handler:
    def handler(req: Request) -> Response:
        r = client.request(req.method, req.path, content=req.content, headers=dict(req.headers))
        return Response(r.status_code, dict(r.headers), r.content)
    return handler


def data_files(tmp_path: Path, n: int) -> list[Path]:
    """Devices with different amounts of data, so FedAvg's weights matter."""
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        count = 20 + 15 * i
        x = rng.normal(size=(count, 4))
        y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
        paths.append(tmp_path / f"device-{i}.npz")
        np.savez(paths[-1], x=x, y=y)
    return paths


def run(coordinator: Coordinator, paths: list[Path], tmp_path: Path,
        wrap: Callable[[Handler], Handler] = lambda h: h, *, watch: list[SecureRound] | None = None) -> dict:
    """Agents for ``paths`` until the coordinator is done; returns ``/v1/status``."""
    with TestClient(create_app(coordinator)) as client:
        handler = wrap(forward(client))
        agents = [
            Agent(AgentConfig(coordinator="http://coordinator.test", data=path,
                              state_dir=tmp_path / f"state-{i}",
                              device_id=f"dev-{i}", insecure=True, backoff_base_s=0.05, backoff_cap_s=0.2),
                  transport=LocalTransport(handler))
            for i, path in enumerate(paths)
        ]
        threads = [threading.Thread(target=a.run) for a in agents]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 90
            while not coordinator.done and time.monotonic() < deadline:
                rnd = coordinator.open
                seen = None if rnd is None else rnd.secagg
                if watch is not None and seen is not None and seen not in watch:
                    watch.append(seen)
                time.sleep(0.005)
        finally:
            for a in agents:
                a.stop()
            for t in threads:
                t.join(timeout=30)
        assert coordinator.done, "training did not finish in time"
        return client.get("/v1/status").json()  # type: ignore[no-any-return]


def test_secure_rounds_reach_the_plaintext_model_within_the_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = data_files(tmp_path, 5)
    plain = Coordinator(config(tmp_path, "plain"))
    run(plain, paths, tmp_path)
    secure = Coordinator(config(tmp_path, "secure", secagg=True, secagg_advertise_s=5.0,
                                secagg_share_s=5.0, secagg_unmask_s=5.0))
    watched: list[SecureRound] = []
    status = run(secure, paths, tmp_path, watch=watched)
    assert [(h["round"], h["state"], h["reported"]) for h in status["history"]] == [
        (r, "complete", 5) for r in (1, 2, 3)]
    for h in status["history"]:
        assert all(h[f"secagg_dropped_{p}"] == 0 for p in ("advertise", "share", "upload", "unmask"))
        assert h["secagg_survivors"] == 5 and h["bytes_up"] > 0 and h["phase_unmask_s"] >= 0
    # Training is seeded per (device, round, attempt): the only difference is the grid's rounding,
    # and FedAvg's weights (20, 35, ... examples) are exact in both.
    for name, value in plain.state.params.items():
        diff = np.abs(secure.state.params[name] - value).max()
        assert 0 < diff < 1e-5, (name, diff)
    for r in watched:  # the total weight is the cohort's examples: exact integers
        assert r.total is not None and int(r.total[-1]) == sum(20 + 15 * i for i in range(5))
    # The coordinator never decoded an update: it recorded masked frames, with no example counts.
    updates = secure.store.updates(1, 1)
    assert len(updates) == 5 and all(u["num_examples"] == 0 for u in updates)
    plain.close()
    secure.close()
    # `fedge rounds show N` lists the round's dropouts by phase; examples are "masked".
    assert main(["rounds", "show", "2", "--data-dir", str(tmp_path / "secure")]) == 0
    shown = capsys.readouterr().out
    assert "secure aggregation: k 4, threshold 3" in shown and "5 survivors" in shown
    assert "dropped by phase: advertise 0, share 0, upload 0, unmask 0" in shown
    assert shown.count("masked") == 5 and "keys" in shown and "unmask" in shown


def test_an_agent_refuses_an_unmask_request_naming_a_device_both_survivor_and_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dishonest coordinator (played by the network) asks dev-0 for both secrets of dev-1."""
    paths = data_files(tmp_path, 5)
    tampered: list[str] = []

    def dishonest(inner: Handler) -> Handler:
        def handler(req: Request) -> Response:
            r = inner(req)
            who = req.headers.get(DEVICE_HEADER.lower())
            if req.method == "GET" and "/secagg/unmask" in req.path and who == "dev-0" and r.status == 200:
                body = json.loads(r.body)
                if body["ready"]:
                    body["dropped"] = [*body["dropped"], "dev-1"]  # dev-1 is a survivor too
                    tampered.append(req.path)
                    return Response(200, r.headers, json.dumps(body).encode())
            return r
        return handler

    coordinator = Coordinator(config(tmp_path, "store", rounds=1, secagg=True, secagg_advertise_s=5.0,
                                     secagg_share_s=5.0, secagg_unmask_s=3.0))
    watched: list[SecureRound] = []
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        status = run(coordinator, paths, tmp_path, dishonest, watch=watched)
    assert tampered
    (secure,) = watched
    assert "dev-0" not in secure.answered and secure.answered == {f"dev-{i}" for i in range(1, 5)}
    assert any("both_shares" in r.getMessage() and "dev-1" in r.getMessage() for r in caplog.records)
    # The four honest answers rebuild everything: the round completes without dev-0's shares.
    assert status["history"][0]["state"] == "complete" and status["history"][0]["secagg_dropped_unmask"] == 1
    coordinator.close()


def test_a_lost_reply_is_retried_and_a_duplicate_means_it_arrived(tmp_path: Path) -> None:
    paths = data_files(tmp_path, 5)
    lost: list[str] = []

    def flaky(inner: Handler) -> Handler:
        def handler(req: Request) -> Response:
            r = inner(req)
            who = req.headers.get(DEVICE_HEADER.lower())
            if req.method == "POST" and "/secagg/" in req.path and who == "dev-2" and req.path not in lost:
                lost.append(req.path)  # delivered, but the answer never comes back
                raise TransportError("connection reset by peer")
            return r
        return handler

    coordinator = Coordinator(config(tmp_path, "store", rounds=1, secagg=True, secagg_advertise_s=5.0,
                                     secagg_share_s=5.0, secagg_unmask_s=5.0))
    watched: list[SecureRound] = []
    status = run(coordinator, paths, tmp_path, flaky, watch=watched)
    assert sorted(p.rsplit("/", 1)[1] for p in lost) == ["keys", "masked", "shares", "unmask"]
    (secure,) = watched
    assert "dev-2" in secure.answered and secure.total is not None
    assert status["history"][0]["state"] == "complete" and status["history"][0]["reported"] == 5
    # Each retry was refused (a duplicate, or the phase had closed meanwhile): each try had arrived.
    # (The last one, of the unmask shares, may come after the run stopped its agents.)
    refusals = status["refusals"]
    assert sum(refusals.get(code, 0) for code in ("duplicate", "out_of_phase", "closed")) >= 3, refusals
    coordinator.close()


def test_central_dp_with_secagg_clips_on_the_device_and_weighs_every_update_one(tmp_path: Path) -> None:
    paths = data_files(tmp_path, 5)
    coordinator = Coordinator(config(tmp_path, "store", rounds=2, secagg=True, secagg_advertise_s=5.0,
                                     secagg_share_s=5.0, secagg_unmask_s=5.0, dp="central", clip_norm=0.05,
                                     noise_multiplier=0.5))
    plans: list[dict] = []

    def spy(inner: Handler) -> Handler:
        def handler(req: Request) -> Response:
            r = inner(req)
            if req.path == "/v1/check-in" and r.status == 200:
                reply = json.loads(r.body)
                if reply.get("plan"):
                    plans.append(reply["plan"])
            return r
        return handler

    watched: list[SecureRound] = []
    status = run(coordinator, paths, tmp_path, spy, watch=watched)
    assert [h["state"] for h in status["history"]] == ["complete", "complete"]
    assert all(p["clip_norm"] == 0.05 and p["secagg"]["weighted"] is False and p["secagg"]["max_weight"] == 1
               for p in plans)
    for r in watched:
        assert r.total is not None and int(r.total[-1]) == 5  # five updates of weight 1
    assert status["privacy"]["epsilon"] > 0
    assert len(coordinator.store.privacy_ledger()) == 2
    coordinator.close()


def test_distributed_dp_devices_add_noise_shares_and_the_ledger_charges_the_effective_multiplier(
    tmp_path: Path,
) -> None:
    paths = data_files(tmp_path, 5)
    coordinator = Coordinator(config(tmp_path, "store", rounds=2, secagg=True, secagg_advertise_s=5.0,
                                     secagg_share_s=5.0, secagg_unmask_s=5.0, dp="distributed",
                                     clip_norm=0.05, noise_multiplier=0.5))
    privacy = coordinator.privacy
    assert privacy is not None and privacy.distributed is not None
    plans: list[dict] = []

    def spy(inner: Handler) -> Handler:
        def handler(req: Request) -> Response:
            r = inner(req)
            if req.path == "/v1/check-in" and r.status == 200:
                reply = json.loads(r.body)
                if reply.get("plan"):
                    plans.append(reply["plan"])
            return r
        return handler

    watched: list[SecureRound] = []
    status = run(coordinator, paths, tmp_path, spy, watch=watched)
    assert [h["state"] for h in status["history"]] == ["complete", "complete"]
    # Each share is sized so that m = max(threshold, min_updates) = 4 of them make the whole noise.
    share = privacy.noise_share_stddev(4)
    assert share > 0 and plans
    for p in plans:
        sa = p["secagg"]
        assert p["clip_norm"] == 0.05 and p["noise_stddev"] == 0.0  # no local noise on top
        assert sa["weighted"] is False and sa["max_weight"] == 1 and sa["min_survivors"] == 4
        assert sa["noise_stddev"] == pytest.approx(share) and sa["bits"] == privacy.distributed.bits
    for r in watched:
        assert r.total is not None and int(r.total[-1]) == 5  # five updates of weight 1
        assert r.grid.noise_stddev == pytest.approx(share)
    ledger = coordinator.store.privacy_ledger()
    assert [row.mode for row in ledger] == ["distributed", "distributed"]
    # The accountant charges the effective multiplier (the nominal one less the grid's rounding).
    assert all(row.noise_multiplier == privacy.distributed.effective_noise_multiplier for row in ledger)
    assert privacy.distributed.effective_noise_multiplier < 0.5
    assert status["privacy"]["epsilon"] == ledger[-1].epsilon > 0
    coordinator.close()

"""Compression over the network: the coordinator's ``[encoding]`` table, real agents, bytes counted.

A real coordinator app (in-process, over its HTTP routes) and real agents
(each on a :class:`~fedge.transport.local.LocalTransport` that forwards to the
app) run rounds with an encoding: the agents learn it from the train plan,
encode (keeping top-k's residual in their state directories), and the
coordinator decodes with its own pipeline and counts every byte.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fedge.agent import Agent, AgentConfig
from fedge.agent.residual import RESIDUAL_FILE, load_residual, save_residual
from fedge.coordinator.app import create_app
from fedge.coordinator.config import CoordinatorConfig, load_coordinator_config
from fedge.coordinator.service import Coordinator
from fedge.data.dataset import DataSpec
from fedge.encoding import EncodingConfig, build_pipeline
from fedge.errors import ConfigError
from fedge.params import ParamsSpec
from fedge.tasks import load_task
from fedge.transport import LocalTransport, Request, Response
from fedge.wire import (
    DEVICE_HEADER,
    CheckInReply,
    EncodingInfo,
    TaskInfo,
    TrainPlan,
    UpdateAck,
    decode_params,
    encode_params,
    encode_update,
    payload_etag,
)


def coordinator_config(tmp_path: Path, **overrides: object) -> CoordinatorConfig:
    values: dict[str, object] = dict(
        task="logreg", num_features=4, num_classes=3, rounds=2, cohort_size=2, min_updates=2,
        min_devices=2, deadline_s=30.0, wait_s=0.05, data_dir=str(tmp_path / "store"), seed=0,
    )
    values.update(overrides)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


def forward(client: TestClient) -> Callable[[Request], Response]:
    def handler(req: Request) -> Response:
        r = client.request(req.method, req.path, content=req.content, headers=dict(req.headers))
        return Response(r.status_code, dict(r.headers), r.content)
    return handler


def data_file(tmp_path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path = tmp_path / f"local-{seed}.npz"
    np.savez(path, x=rng.normal(size=(40, 4)), y=np.arange(40) % 3)
    return path


def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize("compress", ["topk:0.2", "q4"])
def test_agents_encode_as_the_plan_says_and_every_byte_is_counted(tmp_path: Path, compress: str) -> None:
    coordinator = Coordinator(coordinator_config(tmp_path, compress=compress))
    agents: list[Agent] = []
    threads: list[threading.Thread] = []
    with TestClient(create_app(coordinator)) as client:
        for i in range(2):
            config = AgentConfig(coordinator="http://coordinator.test", data=data_file(tmp_path, i),
                                 state_dir=tmp_path / f"agent-{i}", device_id=f"dev-{i}", insecure=True)
            agent = Agent(config, transport=LocalTransport(forward(client)))
            agents.append(agent)
            threads.append(threading.Thread(target=agent.run))
        for t in threads:
            t.start()
        try:
            wait_until(lambda: coordinator.done)
        finally:
            for a in agents:
                a.stop()
            for t in threads:
                t.join(timeout=30)
        status = client.get("/v1/status").json()
    store = coordinator.store
    payload_sizes = []
    for row in status["history"]:
        assert row["state"] == "complete"
        updates = store.updates(row["round"], row["attempt"])
        assert row["bytes_up"] == sum(u["size_bytes"] for u in updates) > 0  # type: ignore[misc]
        (traffic,) = store.metrics(row["round"], row["attempt"], kind="traffic")
        per_device = traffic["metrics"]
        assert set(per_device) == {"up:dev-0", "up:dev-1", "down:dev-0", "down:dev-1"}  # type: ignore[arg-type]
        assert sum(v for k, v in per_device.items() if k.startswith("up:")) == row["bytes_up"]  # type: ignore[attr-defined]
        assert sum(v for k, v in per_device.items() if k.startswith("down:")) == row["bytes_down"]  # type: ignore[attr-defined]
        payload_sizes.append(per_device["down:dev-0"])  # type: ignore[index]
    assert all(s > 0 for s in payload_sizes)
    # The updates are encoded: far smaller than the 15-value float32 update plus its header would be.
    spec = coordinator.params_spec
    pipe = build_pipeline(EncodingConfig(compress), secure_aggregation=False)
    assert pipe.wire_spec(spec) != spec
    residuals = [tmp_path / f"agent-{i}" / RESIDUAL_FILE for i in range(2)]
    if compress.startswith("topk"):
        for path in residuals:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            kept = load_residual(path.parent, spec=spec, encoding=pipe.name)
            assert kept is not None and any(np.abs(v).max() > 0 for v in kept.values())
    else:
        assert not any(p.exists() for p in residuals)
    coordinator.close()


def test_the_plan_carries_the_encoding_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    coordinator = Coordinator(coordinator_config(tmp_path, compress="q8", compress_bucket=4, cohort_size=1,
                                                 min_updates=1, min_devices=1))
    with TestClient(create_app(coordinator)) as client:
        plan = None
        for _ in range(200):
            reply = client.post("/v1/check-in", json={"protocol": 1, "num_examples": 10},
                                headers={DEVICE_HEADER: "a"}).json()
            if reply["action"] == "train":
                plan = reply["plan"]
                break
            time.sleep(0.02)
        assert plan is not None
        assert plan["encoding"] == {"compress": "q8", "bucket_size": 4, "shared_range": None}
        r = client.get("/v1/rounds/1/params", headers={DEVICE_HEADER: "a"})
        params, _ = decode_params(r.content, spec=None, max_bytes=1 << 20)
        delta = {k: np.full_like(v, 0.01) for k, v in params.items()}

        def upload(body: bytes) -> tuple[int, str]:
            resp = client.post("/v1/rounds/1/update", content=body,
                               headers={DEVICE_HEADER: "a", "content-type": "application/octet-stream"})
            return resp.status_code, resp.json().get("error", "")

        # Plain float32, another encoding, and a tampered index: refused, counted, round still open.
        assert upload(encode_update(delta, round=1, attempt=1, num_examples=5)) == (422, "shape_mismatch")
        other = build_pipeline(EncodingConfig("q8"), secure_aggregation=False)
        enc = other.encode(delta, rng=np.random.default_rng(0)).tensors
        assert upload(encode_update(enc, round=1, attempt=1, num_examples=5, encoding="q8"))[0] == 422
        ours = build_pipeline(coordinator.config.encoding, secure_aggregation=False)
        t = ours.encode(delta, rng=np.random.default_rng(0)).tensors
        t[next(k for k in t if k.endswith("/s"))][0, 1] = -1.0
        assert upload(encode_update(t, round=1, attempt=1, num_examples=5, encoding=ours.name)) == (
            400, "bad_payload",
        )
        good = ours.encode(delta, rng=np.random.default_rng(0)).tensors
        body = encode_update(good, round=1, attempt=1, num_examples=5, encoding=ours.name)
        assert upload(body) == (200, "")
        wait_until(lambda: coordinator.state.round == 1)
        row = client.get("/v1/status").json()["history"][0]
        assert row["bytes_up"] > len(body)  # the refused bodies crossed the wire too
        assert row["bytes_down"] == len(r.content)
        # q8 on a constant delta is exact: the new params are the old plus 0.01.
        for name, value in coordinator.state.params.items():
            np.testing.assert_allclose(value, params[name] + 0.01, atol=1e-6)
    coordinator.close()


def test_encoding_table_in_the_coordinator_toml(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('[task]\nnum_features = 4\nnum_classes = 3\n[encoding]\ncompress = "q4"\n'
                    "shared_range = 0.5\n")
    cfg = load_coordinator_config(path)
    assert (cfg.compress, cfg.compress_bucket, cfg.compress_range) == ("q4", None, 0.5)
    assert cfg.encoding_pipeline().name == "q4;range=0.5"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('compress = "lz4"', "unknown stage 'lz4'"),
        ('compress = "topk:7"', r"\(0, 1\]"),
        ('compress = "fp16"\nbucket_size = 8', "only to q8 and q4"),
        ('compress = "q8"\nbucket_size = "big"', "must be int"),
        ('level = 3', "unknown key encoding.level"),
    ],
)
def test_bad_encoding_tables_are_refused(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(f"[task]\nnum_features = 4\nnum_classes = 3\n[encoding]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_coordinator_config(path)


def test_agent_residual_is_dropped_when_it_does_not_fit(tmp_path: Path) -> None:
    spec = ParamsSpec.of({"w": np.zeros((2, 3), np.float32)})
    save_residual(tmp_path, {"w": np.ones((2, 3), np.float32)}, encoding="topk:0.1")
    kept = load_residual(tmp_path, spec=spec, encoding="topk:0.1")
    assert kept is not None and np.array_equal(kept["w"], np.ones((2, 3)))
    assert load_residual(tmp_path, spec=spec, encoding="topk:0.2") is None  # another encoding
    other = ParamsSpec.of({"w": np.zeros((3, 2), np.float32)})
    assert load_residual(tmp_path, spec=other, encoding="topk:0.1") is None  # another model
    save_residual(tmp_path, {"w": np.full((2, 3), np.nan, np.float32)}, encoding="topk:0.1")
    assert load_residual(tmp_path, spec=spec, encoding="topk:0.1") is None
    (tmp_path / RESIDUAL_FILE).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad")
    assert load_residual(tmp_path, spec=spec, encoding="topk:0.1") is None
    assert load_residual(tmp_path / "nowhere", spec=spec, encoding="topk:0.1") is None


def test_agent_refuses_a_plan_whose_encoding_it_cannot_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan naming an unknown stage: the agent uploads nothing and goes back to check-in."""
    info = TaskInfo(name="logreg", num_features=4, num_classes=3)
    params = load_task("logreg", DataSpec(4, 3)).init_params(np.random.default_rng(0))
    payload = encode_params(params)
    plan = TrainPlan(round=1, attempt=1, params_etag=payload_etag(payload), deadline_s=60, local_epochs=1,
                     batch_size=8, lr=0.1, evaluate=False, encoding=EncodingInfo(compress="zip"))
    replies = [CheckInReply(action="train", task=info, plan=plan), CheckInReply(action="done", task=info)]
    seen: list[str] = []

    def handler(req: Request) -> Response:
        seen.append(req.path)
        if req.path == "/v1/check-in":
            reply = replies.pop(0).model_dump_json().encode()
            return Response(200, {"content-type": "application/json"}, reply)
        if req.path.endswith("/params"):
            return Response(200, {"etag": payload_etag(payload)}, payload)
        ack = UpdateAck(round=1, attempt=1).model_dump_json().encode()
        return Response(200, {"content-type": "application/json"}, ack)

    config = AgentConfig(coordinator="http://coordinator.test", data=data_file(tmp_path, 0),
                         state_dir=tmp_path / "agent", device_id="dev-0", insecure=True)
    agent = Agent(config, transport=LocalTransport(handler), sleep=lambda s: None)
    assert agent.run() == 0
    # (device events go to /v1/events between the steps; they are not part of the round)
    assert [p for p in seen if p != "/v1/events"] == ["/v1/check-in", "/v1/rounds/1/params", "/v1/check-in"]
    assert "the train plan's encoding is unusable" in caplog.text
    with pytest.raises(ValueError, match="bucket_size"):
        EncodingInfo(compress="q8", bucket_size=0)

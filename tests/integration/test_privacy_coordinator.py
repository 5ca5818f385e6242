"""Central DP in the coordinator: noise, the ledger in the store, the budget refused across a restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fedge import params as P
from fedge.coordinator.app import create_app
from fedge.coordinator.config import CoordinatorConfig, load_coordinator_config
from fedge.coordinator.service import Coordinator
from fedge.errors import ConfigError
from fedge.privacy.accounting import epsilon_for
from fedge.store import Store
from fedge.wire import DEVICE_HEADER, decode_params, encode_update

DEVICES = ("a", "b", "c")
# The accountant claims no amplification and a sensitivity of 2C (a device
# can push another out of the cohort): epsilon after 1, 2, 3 rounds of z = 2.
PER_ROUND = [epsilon_for(noise_multiplier=2.0, sample_rate=1.0, rounds=t, delta=1e-5, sampling="availability")
             for t in (1, 2, 3)]
BUDGET = (PER_ROUND[1] + PER_ROUND[2]) / 2  # two rounds fit, a third does not


class Clock:
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
        task="logreg", num_features=4, num_classes=3, rounds=10, cohort_size=3, min_updates=3,
        min_devices=3, deadline_s=30.0, wait_s=0.2, data_dir=str(tmp_path / "store"), seed=0,
        dp="central", clip_norm=1.0, noise_multiplier=2.0, epsilon_budget=BUDGET,
    )
    values.update(overrides)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


def check_in(client: TestClient, device: str) -> dict[str, object]:
    r = client.post("/v1/check-in", json={"protocol": 1, "num_examples": 10}, headers={DEVICE_HEADER: device})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def run_round(client: TestClient, coordinator: Coordinator, value: float) -> None:
    """Every device joins the open round and uploads a delta of ``value`` everywhere."""
    done = coordinator.state.round
    for d in DEVICES:
        check_in(client, d)
    wait_until(lambda: coordinator.open is not None)
    rnd = coordinator.open
    assert rnd is not None
    r = client.get(f"/v1/rounds/{rnd.round.round_id}/params", headers={DEVICE_HEADER: "a"})
    params, _ = decode_params(r.content, spec=None, max_bytes=1 << 24)
    for d in DEVICES:
        body = encode_update({k: np.full_like(v, value) for k, v in params.items()},
                             round=rnd.round.round_id, attempt=rnd.attempt, num_examples=10)
        resp = client.post(f"/v1/rounds/{rnd.round.round_id}/update", content=body,
                           headers={DEVICE_HEADER: d, "content-type": "application/octet-stream"})
        assert resp.status_code == 200, resp.text
    wait_until(lambda: coordinator.state.round == done + 1)


def test_budget_stops_the_federation_and_the_refusal_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    config = make_config(tmp_path)
    per_round = PER_ROUND
    assert per_round[1] == pytest.approx(
        epsilon_for(noise_multiplier=1.0, sample_rate=1.0, rounds=2, delta=1e-5, sampling="full")
    )
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        before = P.copy(coordinator.state.params)
        run_round(client, coordinator, 10.0)  # norm far above the clip: clipped on receipt
        moved = P.l2_norm(P.subtract(coordinator.state.params, before))
        # Three clipped updates (norm 1 each) over the fixed denominator 3, plus noise of
        # stddev 2 * 1 / 3 a coordinate: nowhere near the unclipped delta of norm 10 * sqrt(15).
        assert moved < 1.0 + 6 * 2.0 / 3 * np.sqrt(15)
        run_round(client, coordinator, 0.01)
        wait_until(lambda: coordinator.done)
        assert coordinator.state.round == 2
        assert coordinator.stopped is not None and "privacy budget" in coordinator.stopped
        assert check_in(client, "a")["action"] == "done"
        status = client.get("/v1/status").json()
        assert status["privacy"]["epsilon"] == pytest.approx(per_round[1], rel=1e-9)
        assert status["history"][1]["epsilon"] == pytest.approx(per_round[1], rel=1e-9)
        scraped = client.get("/metrics/").text
        assert f"fedge_privacy_epsilon {per_round[1]!r}" in scraped or \
            f"fedge_privacy_epsilon {per_round[1]:.16g}" in scraped
    coordinator.close()

    with Store(config.data_dir) as store:
        ledger = store.privacy_ledger()
    assert [row.round for row in ledger] == [1, 2]
    assert [row.epsilon for row in ledger] == pytest.approx(per_round[:2], rel=1e-9)
    assert {row.sampling for row in ledger} == {"availability"}

    restarted = Coordinator(config, clock=clock)  # same store: the refusal stands at once
    try:
        assert restarted.done and restarted.stopped is not None
        assert restarted.privacy is not None and restarted.privacy.epsilon == pytest.approx(per_round[1])
        with TestClient(create_app(restarted)) as client:
            assert check_in(client, "a")["action"] == "done"
            assert restarted.open is None
    finally:
        restarted.close()

    # Turning privacy off does not escape the ledger.
    with pytest.raises(ConfigError, match="privacy ledger of 2 rounds"):
        Coordinator(make_config(tmp_path, dp=None, clip_norm=None, noise_multiplier=None,
                                epsilon_budget=None), clock=clock)


def test_a_larger_budget_lets_a_restarted_coordinator_go_on(tmp_path: Path) -> None:
    clock = Clock()
    coordinator = Coordinator(make_config(tmp_path, rounds=1), clock=clock)
    with TestClient(create_app(coordinator)) as client:
        run_round(client, coordinator, 0.01)
        wait_until(lambda: coordinator.done)
    coordinator.close()
    again = Coordinator(make_config(tmp_path, rounds=2, epsilon_budget=50.0), clock=clock)
    try:
        assert not again.done and again.privacy is not None and len(again.privacy.ledger) == 1
    finally:
        again.close()


def test_local_dp_puts_clip_and_noise_in_the_plan_and_sums_with_weight_one(tmp_path: Path) -> None:
    clock = Clock()
    config = make_config(tmp_path, dp="local", clip_norm=0.5, noise_multiplier=2.0, epsilon_budget=None,
                         rounds=1)
    coordinator = Coordinator(config, clock=clock)
    try:
        with TestClient(create_app(coordinator)) as client:
            for d in DEVICES:
                check_in(client, d)
            wait_until(lambda: coordinator.open is not None)
            plan = check_in(client, "a")["plan"]
            assert isinstance(plan, dict)
            assert (plan["clip_norm"], plan["noise_stddev"]) == (0.5, 1.0)  # z * C
            before = P.copy(coordinator.state.params)
            run_round(client, coordinator, 0.01)  # what the devices send is summed as is, weight 1
            for name, value in coordinator.state.params.items():
                np.testing.assert_allclose(value, before[name] + 0.01, rtol=1e-5)  # 3 * 0.01 / 3
            assert coordinator.privacy is not None
            assert coordinator.privacy.ledger[0].sampling == "local"
            assert coordinator.privacy.epsilon == pytest.approx(
                epsilon_for(noise_multiplier=2.0, sample_rate=1.0, rounds=1, delta=1e-5, sampling="local")
            )
    finally:
        coordinator.close()


def test_adaptive_clip_moves_and_resumes_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    # sigma_b = 3 / 20 = 0.15, so z must stay below 0.3.
    config = make_config(tmp_path, clip_norm="adaptive", noise_multiplier=0.25, epsilon_budget=None, rounds=1)
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        run_round(client, coordinator, 1.0)  # every update far above the initial clip 0.1
    coordinator.close()
    (row,) = coordinator.privacy.ledger if coordinator.privacy else ()
    assert row.clip_norm == 0.1 and row.next_clip_norm != 0.1
    again = Coordinator(make_config(tmp_path, clip_norm="adaptive", noise_multiplier=0.25,
                                    epsilon_budget=None, rounds=2), clock=clock)
    try:
        assert again.privacy is not None and again.privacy.clip_norm == row.next_clip_norm
        with TestClient(create_app(again)) as client:
            run_round(client, again, 1.0)
        assert again.privacy.ledger[-1].clip_norm == row.next_clip_norm
    finally:
        again.close()


def test_privacy_table_in_the_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[task]\nnum_features = 4\nnum_classes = 3\n[privacy]\nmode = "central"\n'
                    'clip_norm = "adaptive"\ntarget_epsilon = 3.0\ndelta = 1e-6\naccountant = "pld"\n')
    config = load_coordinator_config(path)
    privacy = config.privacy
    assert privacy is not None and privacy.adaptive and privacy.target_epsilon == 3.0
    assert privacy.effective_budget == 3.0 and privacy.delta == 1e-6 and privacy.accountant == "pld"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('mode = "local"\nnoise_multiplier = 1.0\nclip_norm = "adaptive"', "adaptive needs"),
        ('mode = "distributed"\nnoise_multiplier = 1.0', "secure aggregation"),
        ('mode = "nonsense"\nnoise_multiplier = 1.0', "must be one of"),
        ("noise_multiplier = 1.0", "need privacy.mode"),
        ('mode = "central"', "exactly one of noise-multiplier and target-epsilon"),
        ('mode = "central"\nnoise_multiplier = 1.0\ntarget_epsilon = 2.0', "exactly one of"),
        ('mode = "central"\nnoise_multiplier = -1.0', "noise-multiplier must be a positive"),
        ('mode = "central"\nnoise_multiplier = 1.0\nclip_norm = "big"', "clip-norm must be"),
        ('mode = "central"\nnoise_multiplier = 1.0\nclip_norm = 0', "clip-norm must be"),
        ('mode = "central"\nnoise_multiplier = 1.0\ndelta = 1.5', "delta must be in"),
        ('mode = "central"\nnoise_multiplier = 1.0\nbudget = 0', "budget must be a positive"),
        ('mode = "central"\nnoise_multiplier = 1.0\naccountant = "moments"', "accountant must be one of"),
        ('mode = "central"\nnoise_multiplier = 1.0\nepsilon = 3', "unknown key privacy.epsilon"),
    ],
)
def test_bad_privacy_tables_are_refused(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[task]\nnum_features = 4\nnum_classes = 3\n[privacy]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_coordinator_config(path)


def test_adaptive_clipping_needs_enough_count_noise(tmp_path: Path) -> None:
    # sigma_b = cohort / 20 = 0.15 is far below z / 2: the count alone would spend the budget.
    with pytest.raises(ConfigError, match="clip-count noise"):
        Coordinator(make_config(tmp_path, clip_norm="adaptive"), clock=Clock())

"""``fedge simulate --secagg``: real SecAgg+ per device, dropouts per phase, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge import params as P
from fedge.cli import main
from fedge.errors import ConfigError
from fedge.sim.config import SimConfig
from fedge.sim.engine import Simulation, simulate
from fedge.sim.secagg import SimSecAgg
from fedge.strategies import build_strategy


def _max_abs_diff(a: P.Params, b: P.Params) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_secagg_round_matches_plaintext_fedavg_within_the_grid() -> None:
    plain = simulate(rounds=1, devices=12)
    secure = simulate(rounds=1, devices=12, secagg=True, secagg_bits=20)
    grid_step = 1.0 / (2**19 - 1)
    # Each device's rounding error is below one step (scaled by its weight share).
    assert 0 < _max_abs_diff(plain.params, secure.params) <= 12 * grid_step
    assert secure.history[0].reported == 12 and secure.history[0].state == "complete"


def test_processes_backend_gives_the_same_masked_sum_as_inline() -> None:
    inline = simulate(rounds=2, devices=9, secagg=True)
    procs = simulate(rounds=2, devices=9, secagg=True, backend="processes", workers=2)
    # Integer sums mod 2^32 do not depend on the order of addition.
    assert _max_abs_diff(inline.params, procs.params) == 0.0


@pytest.mark.parametrize("phase", ["advertise", "share", "upload", "unmask"])
def test_dropouts_at_each_phase_are_tolerated(phase: str) -> None:
    result = simulate(rounds=3, devices=30, secagg=True, secagg_dropout={phase: 0.2})
    assert all(r.state == "complete" for r in result.history)
    if phase == "unmask":  # their masked inputs are in the sum: they still count
        assert all(r.reported == 30 for r in result.history)
    else:
        assert sum(r.dropped for r in result.history) > 0
        assert all(r.reported + r.dropped == 30 for r in result.history)


def test_unmask_dropouts_change_nothing_in_the_result() -> None:
    full = simulate(rounds=2, devices=20, secagg=True)
    late = simulate(rounds=2, devices=20, secagg=True, secagg_dropout={"unmask": 0.3})
    assert _max_abs_diff(full.params, late.params) == 0.0


def test_below_threshold_rounds_are_abandoned_and_the_model_kept() -> None:
    sim = Simulation(SimConfig(rounds=2, devices=10, secagg=True,
                               secagg_dropout={"upload": 0.8}))
    start = sim.strategy.init(sim.task.init_params(np.random.default_rng([0, 1, 0]))).params
    result = sim.run()
    assert all(r.state == "abandoned" for r in result.history)
    assert _max_abs_diff(result.params, start) == 0.0


class _NeedsEveryUpdate:
    """A strategy that declares itself incompatible (as the robust rules do)."""

    name = "median-like"
    secagg_compatible = False


def test_incompatible_strategy_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="individual update"):
        SimSecAgg(strategy=_NeedsEveryUpdate(), k=None, threshold=None,  # type: ignore[arg-type]
                  clip=1.0, bits=None, max_weight=10, dropout={}, seed=0, cohort=10)
    SimSecAgg(strategy=build_strategy("fedadam", {}), k=None, threshold=None, clip=1.0,
              bits=None, max_weight=10, dropout={}, seed=0, cohort=10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"secagg_k": 4}, "need --secagg"),
        ({"secagg_dropout": {"upload": 0.1}}, "need --secagg"),
        ({"secagg": True, "secagg_dropout": {"later": 0.1}}, "unknown phase"),
        ({"secagg": True, "secagg_dropout": {"upload": 1.0}}, r"\[0, 1\)"),
        ({"secagg": True, "secagg_k": 3}, "even"),
        ({"secagg": True, "secagg_threshold": 1}, "threshold"),
        ({"secagg": True, "secagg_threshold": 2, "secagg_k": 8, "devices": 20}, "threshold 2"),
        ({"secagg": True, "cohort": 2}, "at least 3"),
        ({"secagg": True, "secagg_bits": 32}, "wrap"),
        ({"secagg": True, "secagg_bits": 40}, "secagg-bits"),
        ({"secagg": True, "secagg_clip": 0.0}, "secagg-clip"),
    ],
)
def test_refusals(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        simulate(rounds=1, **overrides)


def test_cli_secagg_flags_and_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('secagg = true\nrounds = 2\n[secagg-dropout]\nshare = 0.1\n')
    out = tmp_path / "out"
    code = main(["simulate", "--config", str(cfg), "--secagg-dropout", "upload=0.1",
                 "--secagg-k", "6", "--no-plot", "--quiet", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["secagg"] is True
    assert summary["config"]["secagg_dropout"] == {"share": 0.1, "upload": 0.1}
    capsys.readouterr()
    code = main(["simulate", "--secagg", "--secagg-dropout", "lunch=0.1", "--no-plot", "--quiet",
                 "--out", str(tmp_path / "bad")])
    assert code == 2
    assert "unknown phase" in capsys.readouterr().err


def test_device_side_drops_a_device_whose_own_checks_refuse_the_round() -> None:
    from fedge.secagg.protocol import RoundSetup, SecAggServer
    from fedge.sim.secagg import SecAggDevices

    setup = RoundSetup(1, tuple(str(i) for i in range(10)), 4, 3, bytes(range(32)), 5)
    devices = SecAggDevices(seed=0)
    keys = devices.call("advertise", setup, dict.fromkeys(setup.cohort))
    assert set(keys) == set(setup.cohort)
    # Device 0's neighbours all vanish before the directory is sent: it cannot share, so it leaves.
    gone = {setup.cohort[v - 1] for v in setup.neighbours()[0]}
    server = SecAggServer(setup)
    for d in setup.cohort:
        if d not in gone:
            server.receive_keys(d, keys[d])
    shares = devices.call("share", server.close_keys(), {d: None for d in setup.cohort if d not in gone})
    assert "0" not in shares and shares
    with pytest.raises(ValueError, match="unknown secure-aggregation step"):
        devices.call("upload", None, {})

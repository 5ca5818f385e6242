"""Simulated device profiles and the virtual clock."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedge.errors import ConfigError
from fedge.sim.profiles import DeviceProfile, FleetModel, build_profiles


def test_lognormal_speeds_have_the_asked_spread() -> None:
    profiles = build_profiles("lognormal-speed:10", 20_000, np.random.default_rng(0))
    speeds = np.array([p.speed for p in profiles])
    p5, p50, p95 = np.percentile(speeds, [5, 50, 95])
    assert p95 / p5 == pytest.approx(10.0, rel=0.1)
    assert p50 == pytest.approx(50.0, rel=0.05)
    assert all(p.window is None and p.dropout == 0 for p in profiles[:10])


def test_diurnal_windows_cover_the_asked_hours() -> None:
    profiles = build_profiles("diurnal:8,dropout:0.1,bandwidth:2:4", 500, np.random.default_rng(1))
    for p in profiles[:50]:
        assert p.window is not None
        start, end = p.window
        assert (end - start) % 24 == pytest.approx(8.0)
        hours = sum(p.available_at(h * 3600.0 + 1) for h in range(24))
        assert hours in (8, 9)  # a window starting mid-hour touches 9 whole hours
        assert p.dropout == 0.1
    links = np.array([p.bandwidth for p in profiles])
    assert np.median(links) == pytest.approx(2e6, rel=0.15)


def test_the_clock_runs_rounds_with_training_transfer_and_the_deadline() -> None:
    profiles = [DeviceProfile(speed=10.0, bandwidth=1e6), DeviceProfile(speed=1.0, bandwidth=1e6),
                DeviceProfile(speed=10.0, bandwidth=1e6, dropout=1.0)]
    fleet = FleetModel(profiles, [100, 100, 100], model_bytes=1_000_000, deadline_s=50.0, overhead_s=1.0)
    assert fleet.estimate_s(0, 1) == pytest.approx(10 + 2)
    assert fleet.estimate_s(1, 2) == pytest.approx(200 + 2)
    finished, lost, took = fleet.play([0, 1, 2], {0: 1, 1: 1, 2: 1}, np.random.default_rng(0))
    assert finished == [0] and lost == [1, 2]
    assert took == 50.0  # it waited for the deadline: someone did not report
    fleet.advance(took)
    assert fleet.now == 51.0
    only_fast, none_lost, took = fleet.play([0], {0: 1}, np.random.default_rng(0))
    assert (only_fast, none_lost, took) == ([0], [], pytest.approx(12.0))
    assert fleet.participation()["never_reported"] == 2


def test_waiting_for_devices_moves_the_clock() -> None:
    early_bird = DeviceProfile(speed=1.0, bandwidth=1.0, window=(8.0, 10.0))
    fleet = FleetModel([early_bird], [1], model_bytes=1, deadline_s=None)
    assert fleet.available().size == 0  # the clock starts at midnight
    assert fleet.wait_for_devices().tolist() == [0]
    assert 8 * 3600 <= fleet.now < 10 * 3600


def test_a_trace_file_gives_each_device_its_profile(tmp_path: Path) -> None:
    csv_trace = tmp_path / "fleet.csv"
    csv_trace.write_text("device,speed,bandwidth_mbps,window,dropout\npi-1,20,0.5,08:00-20:00,0.1\n"
                         "pi-2,5,,,\n")
    a, b = build_profiles(str(csv_trace), 2, np.random.default_rng(0))
    assert (a.speed, a.bandwidth, a.window, a.dropout) == (20.0, 5e5, (8.0, 20.0), 0.1)
    assert (b.speed, b.bandwidth, b.window, b.dropout) == (5.0, 1e6, None, 0.0)
    json_trace = tmp_path / "fleet.json"
    json_trace.write_text(json.dumps([{"speed": 3}, {"speed": 4, "window": "22:00-06:00"}]))
    _, night = build_profiles(str(json_trace), 2, np.random.default_rng(0))
    assert night.window == (22.0, 6.0) and night.available_at(23 * 3600) and not night.available_at(12 * 3600)


@pytest.mark.parametrize(("spec", "message"), [
    ("lognormal-speed:0.5", "must be >= 1"),
    ("lognormal-speed:ten", "expected a number"),
    ("diurnal:30", "must be in [1, 24]"),
    ("dropout:1.5", "must be in [0, 1]"),
    ("bandwidth:0", "must be >= 1e-06"),
    ("warp-speed:9", "unknown term 'warp-speed:9'"),
    ("diurnal,diurnal:4", "names 'diurnal' twice"),
])
def test_bad_profile_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_profiles(spec, 10, np.random.default_rng(0))


@pytest.mark.parametrize(("content", "suffix", "message"), [
    ("device,speed\na,1\n", ".csv", "1 devices in the trace, the run has 3"),
    ("speed,color\n1,red\n2,blue\n3,green\n", ".csv", "unknown column 'color'"),
    ("device\na\nb\nc\n", ".csv", "no speed"),
    ("speed\n1\n-2\n3\n", ".csv", "must be positive"),
    ("speed,window\n1,25:00-01:00\n1,\n1,\n", ".csv", "is not HH:MM-HH:MM"),
    ("{not json", ".json", "not valid JSON"),
    ('{"speed": 1}', ".json", "expected a JSON list of objects"),
])
def test_bad_traces_are_refused(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    trace = tmp_path / f"trace{suffix}"
    trace.write_text(content)
    with pytest.raises(ConfigError, match=message):
        build_profiles(str(trace), 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="cannot read"):
        build_profiles(str(tmp_path / f"missing{suffix}"), 3, np.random.default_rng(0))


def test_simulation_with_profiles_reports_simulated_time_and_participation(tmp_path: Path) -> None:
    from fedge.sim.engine import simulate

    result = simulate(rounds=4, devices=40, cohort=10, profiles="lognormal-speed:10:5,dropout:0.1",
                      deadline_s=30.0, selection="deadline")
    summary = result.summary()
    assert summary["simulated_time_s"] > 0 and math.isfinite(summary["simulated_time_s"])
    times = [r.sim_time_s for r in result.history]
    assert all(t is not None for t in times) and times == sorted(times)
    assert set(summary["participation"]) == {"slowest_decile_rounds", "fastest_decile_rounds",
                                             "mean_rounds", "never_reported"}
    assert all(r.reported + r.dropped == r.invited for r in result.history)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"deadline_s": 10.0}, "--deadline-s needs --profiles"),
    ({"profiles": "diurnal", "selection": "deadline"}, "--selection deadline needs --deadline-s"),
    ({"profiles": "diurnal", "deadline_s": -3.0}, "--deadline-s must be a positive"),
    ({"selection": "smart"}, "--selection must be random or deadline"),
    ({"fairness": 2.0}, "--fairness must be in"),
])
def test_bad_simulation_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    from fedge.sim.config import SimConfig

    with pytest.raises(ConfigError, match=message):
        SimConfig(**kwargs)  # type: ignore[arg-type]

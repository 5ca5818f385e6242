"""The device monitor on fake /proc and /sys trees, the training policy, limits and the profile."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedge.agent.monitor import Monitor, Readings
from fedge.agent.policy import Policy, in_windows, parse_policy, verdict
from fedge.agent.profile import ProfileCache, static_profile
from fedge.agent.trainer import cgroup_memory_limit_mb, parse_limits
from fedge.errors import ConfigError

NOON = dt.datetime(2026, 11, 23, 12, 0)


def fake_root(tmp_path: Path, *, busy: int = 100, cores: int = 2, battery: str | None = "80",
              status: str = "Discharging", ac: str | None = "0", temps: tuple[str, ...] = ("45000",),
              meminfo: str = "MemTotal: 4000000 kB\nMemAvailable: 2048000 kB\n") -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True, exist_ok=True)
    lines = [f"cpu  {busy} 0 0 1000 0 0 0 0 0 0"] + [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(cores)]
    (root / "proc" / "stat").write_text("\n".join(lines) + "\n")
    (root / "proc" / "meminfo").write_text(meminfo)
    ps = root / "sys" / "class" / "power_supply"
    ps.mkdir(parents=True, exist_ok=True)
    if battery is not None:
        (ps / "BAT0").mkdir(exist_ok=True)
        for name, value in {"type": "Battery", "capacity": battery, "status": status, "present": "1"}.items():
            (ps / "BAT0" / name).write_text(value + "\n")
    if ac is not None:
        (ps / "AC").mkdir(exist_ok=True)
        (ps / "AC" / "type").write_text("Mains\n")
        (ps / "AC" / "online").write_text(ac + "\n")
    thermal = root / "sys" / "class" / "thermal"
    thermal.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(temps):
        (thermal / f"thermal_zone{i}").mkdir(exist_ok=True)
        (thermal / f"thermal_zone{i}" / "temp").write_text(t + "\n")
    return root


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_monitor_reads_a_laptop_like_tree(tmp_path: Path) -> None:
    root = fake_root(tmp_path, temps=("45000", "61500", "garbage", "900000"))
    own = [0.0]
    clock = Clock()
    m = Monitor(root, disk_path=tmp_path, own_cpu_s=lambda: own[0], clock=clock)
    first = m.read()
    assert first.cpu_load is None  # no interval yet
    assert first.memory_available_mb == pytest.approx(2000.0)
    assert first.battery_percent == 80.0 and first.on_ac is False
    assert first.temperature_c == 61.5  # the broken zone and the absurd one are skipped
    assert first.disk_free_mb is not None and first.disk_free_mb > 0
    assert first.cores == 2
    # 1 s later: 150 ticks of busy time on 2 cores, 0.5 s of it the agent's own training.
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    fake_root(tmp_path, busy=100 + int(1.5 * ticks))
    own[0] = 0.5
    clock.t = 1.0
    second = m.read()
    assert second.cpu_load == pytest.approx((1.5 - 0.5) / 2, abs=0.02)


def test_monitor_without_battery_or_sensors_reports_unknown(tmp_path: Path) -> None:
    root = fake_root(tmp_path, battery=None, ac=None, temps=())
    r = Monitor(root).read()
    assert (r.battery_percent, r.on_ac, r.temperature_c, r.disk_free_mb) == (None, None, None, None)


def test_monitor_survives_unreadable_files(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "proc" / "meminfo").write_text("nonsense\n")
    (root / "proc" / "stat").write_text("")
    (root / "sys" / "class" / "power_supply" / "BAT0" / "capacity").write_text("lots\n")
    m = Monitor(root)
    r1, r2 = m.read(), m.read()
    assert r1.memory_available_mb is None and r1.battery_percent is None and r2.cpu_load is None


def test_charging_battery_without_an_adapter_counts_as_external_power(tmp_path: Path) -> None:
    root = fake_root(tmp_path, ac=None, status="Charging")
    assert Monitor(root).read().on_ac is True


def test_monitor_on_this_machine_is_fast() -> None:
    import time

    m = Monitor(Path("/"), disk_path=Path("/"))
    m.read()
    t0 = time.perf_counter()
    for _ in range(100):
        m.read()
    assert (time.perf_counter() - t0) / 100 < 0.005  # the bound; it is ~0.2 ms


def readings(**kw: object) -> Readings:
    base = dict(cpu_load=0.1, memory_available_mb=1000.0, battery_percent=90.0, on_ac=True,
                temperature_c=40.0, disk_free_mb=5000.0, cores=4)
    base.update(kw)
    return Readings(**base)  # type: ignore[arg-type]


def test_an_empty_policy_allows_everything() -> None:
    assert verdict(Policy(), readings(cpu_load=1.0, on_ac=False), now=NOON, rounds_today=99).ok


def test_each_condition_gives_its_reason() -> None:
    p = parse_policy({"require_ac": True, "min_battery_percent": 50, "max_cpu_load": 0.5,
                      "min_memory_mb": 512, "max_temperature_c": 70, "min_disk_mb": 100,
                      "windows": ["22:00-06:00"], "max_rounds_per_day": 3})
    v = verdict(p, readings(on_ac=False, battery_percent=20.0, cpu_load=0.9, memory_available_mb=100.0,
                            temperature_c=80.0, disk_free_mb=10.0), now=NOON, rounds_today=3)
    assert not v.ok and not v.pause
    text = " | ".join(v.reasons)
    for part in ("not on AC power", "battery 20% < 50%", "cpu load 0.90 > 0.5", "memory available 100 MB",
                 "temperature 80.0 C > 70 C", "disk free 10 MB", "outside the training windows (22:00-06:00)",
                 "3 rounds today reached max_rounds_per_day 3"):
        assert part in text, part


def test_only_a_busy_cpu_means_pause() -> None:
    p = parse_policy({"max_cpu_load": 0.5, "max_temperature_c": 70})
    busy = verdict(p, readings(cpu_load=0.9), now=NOON, rounds_today=0)
    assert not busy.ok and busy.pause
    hot_and_busy = verdict(p, readings(cpu_load=0.9, temperature_c=90.0), now=NOON, rounds_today=0)
    assert not hot_and_busy.ok and not hot_and_busy.pause


def test_unknown_readings_follow_the_policy() -> None:
    no_sensors = readings(on_ac=None, temperature_c=None, cpu_load=None, battery_percent=None)
    allow = parse_policy({"require_ac": True, "max_temperature_c": 70, "min_battery_percent": 30})
    v = verdict(allow, no_sensors, now=NOON, rounds_today=0)
    assert v.ok and "temperature unknown" in v.notes and "no battery" in v.notes
    deny = parse_policy({"require_ac": True, "max_temperature_c": 70, "unknown": "deny"})
    v = verdict(deny, no_sensors, now=NOON, rounds_today=0)
    assert not v.ok and set(v.reasons) == {"power source unknown", "temperature unknown"}


@pytest.mark.parametrize(("window", "hour", "minute", "inside"), [
    ("22:00-06:00", 23, 0, True), ("22:00-06:00", 5, 59, True), ("22:00-06:00", 6, 0, False),
    ("22:00-06:00", 12, 0, False), ("09:30-17:00", 9, 30, True), ("09:30-17:00", 17, 0, False),
    ("00:00-24:00", 23, 59, True),
])
def test_windows_wrap_midnight(window: str, hour: int, minute: int, inside: bool) -> None:
    p = parse_policy({"windows": [window]})
    assert in_windows(p.windows, dt.datetime(2026, 1, 1, hour, minute)) is inside


@given(st.integers(0, 23), st.integers(0, 59), st.integers(0, 23), st.integers(0, 59))
def test_a_window_and_its_complement_cover_the_day_once(h1: int, m1: int, h2: int, m2: int) -> None:
    a, b = f"{h1:02d}:{m1:02d}", f"{h2:02d}:{m2:02d}"
    if a == b:
        return
    there, back = parse_policy({"windows": [f"{a}-{b}"]}), parse_policy({"windows": [f"{b}-{a}"]})
    for minute in range(0, 24 * 60, 37):
        now = dt.datetime(2026, 1, 1, minute // 60, minute % 60)
        assert in_windows(there.windows, now) != in_windows(back.windows, now)


@pytest.mark.parametrize(("table", "message"), [
    ({"min_battery": 20}, "unknown key 'min_battery'"),
    ({"min_battery_percent": -5}, "min_battery_percent must be between 0 and 100, got -5"),
    ({"min_battery_percent": 101}, "between 0 and 100"),
    ({"max_cpu_load": 1.5}, "max_cpu_load must be between 0 and 1"),
    ({"max_cpu_load": "high"}, "max_cpu_load must be a number"),
    ({"max_temperature_c": float("nan")}, "must be a number"),
    ({"require_ac": "yes"}, "require_ac must be true or false"),
    ({"windows": ["25:00-06:00"]}, "window '25:00-06:00' is not HH:MM-HH:MM"),
    ({"windows": ["22:00-24:30"]}, "ends after 24:00"),
    ({"windows": ["10:00-10:00"]}, "is empty"),
    ({"windows": "22:00-06:00"}, "windows must be a non-empty list"),
    ({"windows": []}, "windows must be a non-empty list"),
    ({"max_rounds_per_day": 0}, "max_rounds_per_day must be an integer >= 1"),
    ({"max_rounds_per_day": 2.5}, "max_rounds_per_day must be an integer >= 1"),
    ({"unknown": "maybe"}, "unknown must be \"allow\" or \"deny\""),
])
def test_bad_policy_values_are_refused_with_key_and_value(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(table)


@pytest.mark.parametrize(("table", "message"), [
    ({"threads": 0}, "threads must be an integer between 1 and 1024"),
    ({"nice": 20}, "nice must be an integer between 0 and 19"),
    ({"nice": -1}, "nice must be an integer between 0 and 19"),
    ({"memory_mb": 10}, "memory_mb must be a number >= 64"),
    ({"max_train_s": 0}, "max_train_s must be a number >= 1"),
    ({"io_idle": 1}, "io_idle must be true or false"),
    ({"cpu_quota": 50}, "unknown key 'cpu_quota'"),
])
def test_bad_limits_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_limits(table)


def test_cgroup_limits_v1_and_v2(tmp_path: Path) -> None:
    root = tmp_path
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text("0::/system.slice/fedge-agent.service\n")
    v2 = root / "sys/fs/cgroup/system.slice/fedge-agent.service"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text(f"{512 * 1024 * 1024}\n")
    assert cgroup_memory_limit_mb(root) == 512.0
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_memory_limit_mb(root) is None
    (root / "proc" / "self" / "cgroup").write_text("5:memory:/fedge\n")
    v1 = root / "sys/fs/cgroup/memory/fedge"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{256 * 1024 * 1024}\n")
    assert cgroup_memory_limit_mb(root) == 256.0


def test_profile_is_cached_and_refreshed(tmp_path: Path) -> None:
    now = [1000.0]
    cache = ProfileCache(tmp_path, refresh_s=3600, clock=lambda: now[0])
    assert cache.profile.cores >= 1 and cache.profile.arch and cache.stale("logreg")
    cache.measure("logreg", lambda: (500, 0.25))
    assert cache.profile.examples_per_s == 2000.0 and not cache.stale("logreg")
    assert cache.stale("mlp")  # another task
    again = ProfileCache(tmp_path, refresh_s=3600, clock=lambda: now[0])
    assert again.profile.examples_per_s == 2000.0 and not again.stale("logreg")
    now[0] += 3601
    assert again.stale("logreg")
    (tmp_path / "profile.json").write_text("{broken")
    assert ProfileCache(tmp_path).profile.examples_per_s is None
    data = json.loads(json.dumps(cache.profile.to_json()))
    assert data["task"] == "logreg"


def test_accelerators_are_detected_from_files(tmp_path: Path) -> None:
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "proc" / "driver" / "nvidia" / "version").write_text("NVRM version: 550\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36\n")
    assert static_profile(tmp_path).accelerators == ("cuda", "jetson")
    assert static_profile(tmp_path / "nothing").accelerators == ()


def test_agent_threads_are_set_before_numpy_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedge.cli import _agent_threads

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "agent.toml"
    config.write_text("[limits]\nthreads = 2\n")
    _agent_threads(config)
    import os

    assert os.environ["OPENBLAS_NUM_THREADS"] == "2" and os.environ["OMP_NUM_THREADS"] == "2"
    config.write_text("[limits]\nthreads = 0\n")  # bad: left to the config check to refuse
    monkeypatch.delenv("OMP_NUM_THREADS")
    _agent_threads(config)
    assert "OMP_NUM_THREADS" not in os.environ
    _agent_threads(tmp_path / "missing.toml")  # no crash; the config check reports it

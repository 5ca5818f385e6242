"""Tests for fedge.lab.report: report.json and the self-contained report.html."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge.lab.report import render_html, validate_report, write_report

T0 = 1_700_000_000.0


def _device(name: str, group: str, arch: str, *, up: int, down: int, ratio: float = 1.0) -> dict[str, object]:
    return {
        "name": name, "group": group, "arch": arch, "cpus": 1.0,
        "memory_bytes": 384 * 2**20, "disk_bytes": 64 * 2**20, "rate_bps": None, "loss": 0.0,
        "rounds_invited": 5, "rounds_completed": 5, "rounds_dropped": 0, "drop_reasons": {},
        "train_s": 12.5, "transfer_s": 3.25,
        "kernel": {"rx_bytes": up + 9000, "tx_bytes": down + 9000, "rx_packets": 120,
                   "tx_packets": 110, "payload_up": up, "payload_down": down},
        "fedge": {"sent": round(up * ratio), "received": down, "connections": 3},
        "agreement": {"up": ratio, "down": 1.0},
        "restarts": 0,
    }


def sample() -> dict[str, object]:
    """A complete report of a 4-device lab, 5 rounds, with the CI lab's faults."""
    devices = [
        _device("pi-0", "pi", "arm64", up=410_000, down=820_000),
        _device("pisl-0", "pisl", "arm64", up=400_000, down=800_000, ratio=0.9),
        _device("x86-0", "x86", "amd64", up=405_000, down=810_000),
        _device("x86-1", "x86", "amd64", up=380_000, down=790_000),
    ]
    devices[1].update(rate_bps=1_000_000, loss=0.05, rounds_completed=4, rounds_dropped=1,
                      drop_reasons={"deadline": 1})
    rounds = [
        {"round": n, "attempts": 2 if n == 3 else 1, "state": "complete",
         "participants": ["pi-0", "pisl-0", "x86-0", "x86-1"] if n != 4 else 3,
         "accuracy": 0.5 + 0.08 * n, "loss": 1.5 - 0.2 * n, "duration_s": 30.0 + n,
         "phases": {"download": 2.0, "train": 20.0, "upload": 3.0, "secagg": 4.0},
         "bytes_up": 300_000, "bytes_down": 640_000,
         "opened_unix": T0 + 40.0 * n - 30.0 - n, "closed_unix": T0 + 40.0 * n}
        for n in range(1, 6)
    ]
    faults = [
        {"at": "round 3", "action": "kill-coordinator", "target": None, "fired_unix": T0 + 85.0,
         "round_at_fire": 3, "recovered_unix": T0 + 92.5, "recovery_s": 7.5,
         "outcome": "restarted; round 3 restarted, agents reconnected"},
        {"at": {"at_round": 4}, "action": "link-down", "target": "x86-1", "fired_unix": T0 + 125.0,
         "round_at_fire": 4, "recovered_unix": T0 + 146.0, "recovery_s": 21.0,
         "outcome": "x86-1 dropped from round 4, back in round 5"},
        {"at": "40.0 s", "action": "fill-disk", "target": "pi-0", "fired_unix": T0 + 40.0,
         "round_at_fire": 1, "recovered_unix": None, "recovery_s": None, "outcome": "agent stopped"},
        {"at": "900.0 s", "action": "kill-agent", "target": "x86-0", "fired_unix": None,
         "round_at_fire": None, "recovered_unix": None, "recovery_s": None, "outcome": "not fired"},
    ]
    return {
        "lab": {"name": "ci", "spec": "deploy/lab/ci.toml", "started_unix": T0, "wall_s": 210.0,
                "ok": True, "error": None,
                "coordinator": {"address": "https://10.213.0.1:8443", "restarts": 1}},
        "devices": devices,
        "rounds": rounds,
        "faults": faults,
        "comparison": {"simulated_accuracy": 0.91, "lab_accuracy": 0.9, "difference": -0.01},
        "overhead": {"lab_cpu_s": 3.1, "wall_s": 210.0, "share_of_one_core": 0.0148},
    }


def _figure(html_text: str, name: str) -> str:
    m = re.search(rf'<figure id="fig-{name}">(.*?)</figure>', html_text, re.S)
    assert m is not None, f"figure {name} missing"
    return m.group(1)


def test_write_report_writes_sorted_indented_json_and_html(tmp_path: Path) -> None:
    report = sample()
    json_path, html_path = write_report(tmp_path / "out", report)
    assert (json_path.name, html_path.name) == ("report.json", "report.html")
    text = json_path.read_text()
    assert json.loads(text) == report
    assert text == json.dumps(report, sort_keys=True, indent=2) + "\n"
    assert html_path.read_text().startswith("<!doctype html>")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json"]


def test_html_shows_header_and_every_table_row() -> None:
    page = render_html(sample())
    assert 'fedge lab ci <span class="badge ok">ok</span>' in page
    assert "210.0 s" in page and "0.9000" in page and "0.9100" in page and "-0.0100" in page
    assert "restarted 1 time(s)" in page and "1.48% of one core" in page
    for name in ("pi-0", "pisl-0", "x86-0", "x86-1"):
        assert f'<td class="t">{name}</td>' in page
    assert "1 Mbit/s" in page and "unshaped" in page and "deadline \u00d71" in page
    assert page.count("<tr>") == 1 + 4 + 1 + 5 + 1 + 4   # heads and rows of the three tables
    assert "kill-coordinator" in page and "+85.0 s" in page and "not fired" in page
    assert "<th>train</th>" in page and "<th>secagg</th>" in page   # phase columns


def test_agreement_outside_five_percent_is_marked() -> None:
    page = render_html(sample())
    assert '<td class="off">0.900</td>' in page
    assert '<td class="off">1.000</td>' not in page and "<td>1.000</td>" in page


def test_failed_run_shows_the_error() -> None:
    report = sample()
    lab = report["lab"]
    assert isinstance(lab, dict)
    lab.update(ok=False, error="round 4 did not complete within its deadline")
    page = render_html(report)
    assert '<span class="badge failed">failed</span>' in page
    assert '<p class="error">round 4 did not complete within its deadline</p>' in page


def test_html_names_no_external_resource() -> None:
    page = render_html(sample())
    assert "http://" not in page.replace("https://10.213.0.1:8443", "")
    assert "https://" not in page.replace("https://10.213.0.1:8443", "")
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert " src=" not in page and "@import" not in page
    assert re.findall(r"url\((.)", page) and set(re.findall(r"url\((.)", page)) == {"#"}  # fragments only
    assert set(re.findall(r'href="(.)', page)) == {"#"}


def test_every_figure_is_inline_svg() -> None:
    page = render_html(sample())
    for name in ("accuracy", "phases", "bytes", "faults"):
        fig = _figure(page, name)
        assert fig.startswith("<svg") and fig.count("<svg") == 1 and "</svg>" in fig
        assert "<figcaption>" in fig
    assert "simulation (0.9100)" in _figure(page, "accuracy")
    assert "secagg" in _figure(page, "phases") and "other" in _figure(page, "phases")
    assert all(n in _figure(page, "bytes") for n in ("pisl-0", "x86-1", "kernel payload"))
    faults = _figure(page, "faults")
    assert "link-down x86-1" in faults and "(not fired)" in faults and "r5" in faults


def test_svg_ids_are_unique_and_rendering_is_deterministic() -> None:
    page = render_html(sample())
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) > 10 and len(ids) == len(set(ids))
    refs = set(re.findall(r'href="#([^"]+)"', page)) | set(re.findall(r"url\(#([^)]+)\)", page))
    assert refs <= set(ids)
    assert render_html(sample()) == page


@pytest.mark.parametrize("hostile", ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>'])
def test_strings_are_escaped_everywhere(hostile: str) -> None:
    report = sample()
    devices = report["devices"]
    faults = report["faults"]
    lab = report["lab"]
    assert isinstance(devices, list) and isinstance(faults, list) and isinstance(lab, dict)
    devices[0]["name"] = hostile
    devices[0]["drop_reasons"] = {hostile: 1}
    faults[1]["target"] = hostile
    faults[1]["outcome"] = hostile
    lab.update(name=hostile, error=hostile, ok=False)
    page = render_html(report)
    assert hostile not in page
    assert "<script" not in page and "<img" not in page
    assert page.count("&lt;") >= 6
    # the name reaches the figures as escaped SVG text too
    assert "&lt;" in _figure(page, "bytes") and "&lt;" in _figure(page, "faults")


def test_dollar_in_a_name_is_drawn_literally() -> None:
    report = sample()
    devices = report["devices"]
    assert isinstance(devices, list)
    devices[0]["name"] = "a$b$c$"   # mathtext would parse (or fail on) this
    page = render_html(report)
    assert "a$b$c$" in _figure(page, "bytes")


def test_nulls_render_as_dashes_and_nan_becomes_null(tmp_path: Path) -> None:
    report = sample()
    devices, rounds, comparison = report["devices"], report["rounds"], report["comparison"]
    assert isinstance(devices, list) and isinstance(rounds, list) and isinstance(comparison, dict)
    devices[0]["fedge"] = {"sent": None, "received": None, "connections": None}
    devices[0]["agreement"] = {"up": None, "down": float("nan")}
    devices[0]["train_s"] = None
    rounds[0]["accuracy"] = float("nan")
    comparison.update(simulated_accuracy=None, difference=None)
    json_path, html_path = write_report(tmp_path, report)
    data = json.loads(json_path.read_text())
    assert data["devices"][0]["agreement"]["down"] is None and data["rounds"][0]["accuracy"] is None
    assert "NaN" not in json_path.read_text()
    page = html_path.read_text()
    assert "nan" not in page.lower().replace("nanoseconds", "")
    assert '<td class="off">\u2013</td>' in page   # an unknown agreement is marked too
    assert "simulation (" not in _figure(page, "accuracy")


def test_empty_run_says_nothing_to_draw() -> None:
    report = sample()
    lab = report["lab"]
    assert isinstance(lab, dict)
    lab.update(ok=False, error="prerequisites missing: podman")
    report.update(devices=[], rounds=[], faults=[])
    report["comparison"] = {"simulated_accuracy": None, "lab_accuracy": None, "difference": None}
    page = render_html(report)
    assert "No device was started." in page and "No round ran." in page
    assert "No fault was scheduled." in page
    assert "<svg" not in page and page.count("nothing to draw") == 4


def test_without_matplotlib_the_tables_still_render(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes the import raise ImportError
    page = render_html(sample())
    assert "The figures need matplotlib, which is not installed." in page
    assert "<svg" not in page and '<td class="t">pi-0</td>' in page


def _delete(report: dict[str, object], path: str) -> None:
    node: object = report
    keys = re.findall(r"[a-z_]+|\[\d+\]", path)
    for key in keys[:-1]:
        node = node[int(key[1:-1])] if key.startswith("[") else node[key]  # type: ignore[index]
    del node[keys[-1]]  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", [
    "lab", "devices", "rounds", "faults", "comparison", "overhead",
    "lab.name", "lab.ok", "lab.error", "lab.coordinator", "lab.coordinator.restarts",
    "devices[2].kernel.rx_bytes", "devices[0].rate_bps", "devices[3].fedge.sent",
    "devices[1].agreement.down", "devices[0].drop_reasons",
    "rounds[1].phases", "rounds[4].accuracy", "faults[0].outcome", "faults[3].recovered_unix",
    "comparison.difference", "overhead.share_of_one_core",
])
def test_a_missing_key_is_refused_by_name(path: str, tmp_path: Path) -> None:
    report = copy.deepcopy(sample())
    _delete(report, path)
    with pytest.raises(ConfigError, match=rf"^lab report: {re.escape(path)}: missing$"):
        write_report(tmp_path, report)
    with pytest.raises(ValueError, match=re.escape(path)):
        render_html(report)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("path", "value", "message"), [
    ("lab.ok", "yes", r"lab\.ok: must be true or false, got 'yes'"),
    ("lab.started_unix", None, r"lab\.started_unix: must be a number, got None"),
    ("lab.coordinator", "10.213.0.1", r"lab\.coordinator: must be a mapping, got str"),
    ("devices", {"pi-0": {}}, r"devices: must be a list, got dict"),
    ("rounds", "12345", r"rounds: must be a list, got str"),
    ("devices[0].memory_bytes", True, r"devices\[0\]\.memory_bytes: must be an integer, got True"),
    ("devices[0].kernel.rx_bytes", None, r"kernel\.rx_bytes: must be an integer, got None"),
    ("devices[1].drop_reasons", {"deadline": "two"}, r"drop_reasons: must be a mapping of names to numbers"),
    ("devices[1].agreement.up", "0.99", r"agreement\.up: must be a number or null, got '0\.99'"),
    ("rounds[0].phases", [1.0, 2.0], r"rounds\[0\]\.phases: must be a mapping of names to numbers"),
    ("faults[0].outcome", None, r"faults\[0\]\.outcome: must be a string, got None"),
])
def test_a_value_of_the_wrong_kind_is_refused(path: str, value: object, message: str) -> None:
    report = copy.deepcopy(sample())
    keys = re.findall(r"[a-z_]+|\[\d+\]", path)
    node: object = report
    for key in keys[:-1]:
        node = node[int(key[1:-1])] if key.startswith("[") else node[key]  # type: ignore[index]
    node[keys[-1]] = value  # type: ignore[index]
    with pytest.raises(ConfigError, match=message):
        validate_report(report)


def test_a_report_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="report: must be a mapping, got list"):
        validate_report([])  # type: ignore[arg-type]


def test_a_value_json_cannot_hold_is_refused(tmp_path: Path) -> None:
    report = sample()
    report["extra"] = {1, 2}
    with pytest.raises(ConfigError, match="type set cannot be written as JSON"):
        write_report(tmp_path, report)


def test_a_path_value_is_written_as_text(tmp_path: Path) -> None:
    report = sample()
    report["out_dir"] = tmp_path
    json_path, _ = write_report(tmp_path / "o", report)
    assert json.loads(json_path.read_text())["out_dir"] == str(tmp_path)


def test_an_unwritable_folder_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"lab report folder .*file/out.* cannot be made"):
        write_report(blocker / "out", sample())


def test_a_run_that_ended_before_the_counters_were_read_renders(tmp_path: Path) -> None:
    report = sample()
    devices, lab, faults = report["devices"], report["lab"], report["faults"]
    assert isinstance(devices, list) and isinstance(lab, dict) and isinstance(faults, list)
    for d in devices:
        d.update(kernel=None, agreement=None)
    report["overhead"] = {"lab_cpu_s": 0.0, "wall_s": 0.0, "share_of_one_core": None}
    lab.update(ok=False, error="coordinator did not start", leftovers=["netns fedge-ci-pi-0"],
               timeline_s={"network up": 1.5, "coordinator up": 4.25})
    faults[0]["at"] = {"round": 3}
    faults[2]["at"] = {"s": 40.0}
    json_path, html_path = write_report(tmp_path, report)
    assert json.loads(json_path.read_text())["devices"][0]["kernel"] is None
    page = html_path.read_text()
    assert '<p class="error">teardown left behind: netns fedge-ci-pi-0</p>' in page
    assert "network up +1.5 s, coordinator up +4.25 s" in page
    assert '<td class="t">round 3</td>' in page and '<td class="t">40.0 s</td>' in page
    assert page.count('<td class="off">\u2013</td>') == 8   # 4 devices x (up, down) unknown agreement
    assert "= \u2013 of one core" in page
    assert "<svg" in _figure(page, "bytes")


def test_reported_of_invited_is_shown_when_the_runner_gives_invited() -> None:
    report = sample()
    rounds = report["rounds"]
    assert isinstance(rounds, list)
    rounds[3].update(participants=3, invited=4)
    assert "<td>3/4</td>" in render_html(report)


@pytest.mark.parametrize("path", ["devices[0].fedge", "lab.coordinator"])
def test_only_the_marked_sub_mappings_may_be_null(path: str) -> None:
    report = copy.deepcopy(sample())
    head, key = path.rsplit(".", 1)
    node: object = report
    for part in re.findall(r"[a-z_]+|\[\d+\]", head):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]  # type: ignore[index]
    node[key] = None  # type: ignore[index]
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}: must be a mapping, got NoneType"):
        validate_report(report)


def test_sizes_and_rates_never_show_an_exponent() -> None:
    from fedge.lab.report import _bytes, _rate

    assert [_bytes(x) for x in (0, 1023, 1000 * 1024, 2**20, 1.5 * 2**30, None)] == [
        "0 B", "1023 B", "1000 KiB", "1 MiB", "1.5 GiB", "\u2013"]
    assert [_rate(x) for x in (None, 256_000, 999_999, 1_000_000)] == [
        "unshaped", "256 kbit/s", "1000 kbit/s", "1 Mbit/s"]


def test_the_agents_benchmark_is_shown_when_profiles_are_given() -> None:
    report = sample()
    assert "examples/s" not in render_html(report)
    devices = report["devices"]
    assert isinstance(devices, list)
    devices[0]["profile"] = {"arch": "aarch64", "examples_per_s": 812.345}
    devices[1]["profile"] = None
    page = render_html(report)
    assert "<th>examples/s</th>" in page and "<td>812.3</td>" in page
    assert page.count("<td>\u2013</td>") >= 3   # the devices without a benchmark

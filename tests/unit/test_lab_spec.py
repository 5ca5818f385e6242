"""The lab spec parser: the example specs load, and every refused input is refused with one clear line."""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.errors import ConfigError
from fedge.lab.spec import COORDINATOR_PORT, LabSpec, load_spec, parse_rate, parse_size, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "deploy" / "lab" / "ci.toml"
FLEET = ROOT / "deploy" / "lab" / "fleet12.toml"


def ci() -> dict[str, Any]:
    return tomllib.loads(CI.read_text())


def parse(data: dict[str, Any], base_dir: Path = CI.parent) -> LabSpec:
    return parse_spec(data, base_dir=base_dir, name="ci.toml")


def refused(change: Callable[[dict[str, Any]], object], base_dir: Path = CI.parent) -> str:
    data = ci()
    change(data)
    with pytest.raises(ConfigError) as e:
        parse(data, base_dir)
    text = str(e.value)
    assert "\n" not in text and text.startswith("lab spec ci.toml: ")
    return text.removeprefix("lab spec ci.toml: ")


# ------------------------------------------------------------------ what loads


def test_ci_spec_is_the_issue_lab() -> None:
    spec = load_spec(CI)
    devices = spec.devices()
    assert [d.name for d in devices] == ["pi-0", "pisl-0", "x86-0", "x86-1"]
    assert [d.index for d in devices] == [0, 1, 2, 3]
    assert [d.address for d in devices] == ["10.213.0.2", "10.213.0.3", "10.213.0.4", "10.213.0.5"]
    assert spec.coordinator_address == "10.213.0.1"
    assert [d.arch for d in devices] == ["arm64", "arm64", "amd64", "amd64"]
    assert spec.arches == {"amd64", "arm64"}
    assert devices[0].memory_bytes == 384 * 2**20 and devices[2].memory_bytes == 256 * 2**20
    assert devices[2].cpus == 0.5 and devices[0].disk_bytes == 64 * 2**20
    slow = devices[1].link
    assert (slow.rate_bps, slow.loss) == (1_000_000, 0.05)
    assert devices[0].link.rate_bps is None and devices[0].link.loss == 0.0
    assert spec.rounds == 5
    config = spec.federation_config
    assert config.secagg and config.effective_min_updates == 3 and config.deadline_s == 180.0
    assert (config.host, config.port, config.seed) == ("10.213.0.1", COORDINATOR_PORT, 0)
    faults = spec.faults
    assert [(f.action, f.at_round, f.target, f.restart) for f in faults] == [
        ("link-down", 2, "x86-1", True), ("kill-coordinator", 3, None, True)]
    assert faults[0].for_s == 20.0
    assert spec.path == CI


def test_fleet12_spec_folds_outages_into_sorted_faults() -> None:
    spec = load_spec(FLEET)
    assert len(spec.devices()) == 12
    assert {d.group for d in spec.devices()} == {"gw", "pi", "cell"}
    faults = spec.faults
    rounds = [f.at_round for f in faults if f.at_round is not None]
    assert rounds == sorted(rounds) and len(rounds) == 6
    outage = faults[-1]  # timed faults come after round faults
    assert (outage.action, outage.target, outage.at_s, outage.for_s) == ("link-down", "cell", 120.0, 45.0)
    assert outage.origin == "group[2].link.outages[0]"
    assert [len(spec.targets(f.target)) for f in faults if f.target] == [1, 1, 1, 4, 1, 4]
    memory = next(f for f in faults if f.action == "fill-memory")
    assert memory.size_bytes == 300 * 2**20
    assert next(f for f in faults if f.action == "rate").rate_bps == 64_000


def test_defaults_and_federation_seed() -> None:
    data = ci()
    del data["group"][1]["link"]
    data["group"][0] = {"name": "pi", "count": 1}
    data["federation"]["server"] = {"seed": 9}
    spec = parse(data)
    d = spec.devices()[0]
    assert (d.arch, d.cpus, d.memory_bytes, d.disk_bytes) == ("amd64", 1.0, 256 * 2**20, 64 * 2**20)
    assert spec.lab.timeout_s == 1800 and spec.federation_config.seed == 9


def test_relative_data_path_is_relative_to_the_spec(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.normal(size=(50, 3)), y=np.arange(50) % 2)
    data = ci()
    data["data"]["source"] = "mine.npz"
    spec = parse(data, base_dir=tmp_path)
    assert spec.data.source == str(tmp_path / "mine.npz")


@pytest.mark.parametrize(("text", "bps"), [("1mbit", 10**6), ("256kbit", 256_000), ("1.5mbit", 1_500_000),
                                           ("2gbit", 2 * 10**9), ("800bit", 800), ("  64 kbit ", 64_000),
                                           ("1MBIT", 10**6), (8000, 8000)])
def test_parse_rate(text: str | int, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize(("text", "why"), [("-1mbit", "must be > 0"), ("0kbit", "must be > 0"),
                                          (0, "must be > 0"), ("1mbps", "bytes per second"),
                                          ("fast", "must be a rate"),
                                          ("1 mb", "must be a rate"), (True, "must be a rate"),
                                          (1.5, "must be a rate")])
def test_parse_rate_refuses(text: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_rate(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "size"), [("64m", 64 * 2**20), ("1g", 2**30), ("512k", 512 * 2**10),
                                            ("1.5g", 3 * 2**29), ("100", 100), (4096, 4096), ("2MiB", 2**21)])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-64m", "0", "lots", "64t", False, 1.5])
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)  # type: ignore[arg-type]


# ------------------------------------------------------------------ one refusal per bad input


def test_the_issue_example_message() -> None:
    assert refused(lambda d: d["group"][1]["link"].update(rate="-1mbit")) == (
        'group[1].link.rate: must be > 0, got "-1mbit"')


UNKNOWN_KEYS = [
    (lambda d: d.update(extra={}), "unknown key 'extra'; known: lab, data, federation, group, fault"),
    (lambda d: d["lab"].update(colour=1), "lab: unknown key 'colour'; known: name, subnet, seed, timeout_s"),
    (lambda d: d["data"].update(shuffle=True), "data: unknown key 'shuffle'"),
    (lambda d: d["group"][0].update(gpu=1), "group[0]: unknown key 'gpu'; known: name, count, arch"),
    (lambda d: d["group"][1]["link"].update(delay="5ms"),
     "group[1].link: unknown key 'delay'; known: rate, loss"),
    (lambda d: d["group"][1]["link"].update(outages=[{"at_s": 1.0, "for_s": 2.0, "why": "x"}]),
     "group[1].link.outages[0]: unknown key 'why'; known: at_s, for_s"),
    (lambda d: d["fault"][1].update(when="now"), "fault[1]: unknown key 'when'"),
    (lambda d: d["federation"].update(extra={"a": 1}), "federation: unknown table [extra]"),
    (lambda d: d["federation"]["rounds"].update(speed=1), "federation: unknown key rounds.speed"),
    (lambda d: d["group"][0].update(policy={"sunny": True}), "group[0].policy: unknown key 'sunny'"),
]


@pytest.mark.parametrize(("change", "message"), UNKNOWN_KEYS)
def test_unknown_keys_at_every_level(change: Callable[[dict[str, Any]], object], message: str) -> None:
    assert message in refused(change)


BAD_VALUES = [
    # [lab]
    (lambda d: d["lab"].pop("name"), "lab.name: required"),
    (lambda d: d["lab"].update(name="CI"), 'lab.name: must be 1 to 6 lowercase letters or digits, got "CI"'),
    (lambda d: d["lab"].update(name="toolong"), "lab.name: must be 1 to 6"),
    (lambda d: d["lab"].update(subnet="8.8.8.0/24"), "lab.subnet: must lie in a private range"),
    (lambda d: d["lab"].update(subnet="10.1.2.5/24"),
     "lab.subnet: has host bits set; the network is 10.1.2.0/24"),
    (lambda d: d["lab"].update(subnet="10.1.2.0/31"), "lab.subnet: leaves no address for a device"),
    (lambda d: d["lab"].update(subnet="lab-net"),
     'lab.subnet: must be an IPv4 subnet such as "10.213.0.0/24"'),
    (lambda d: d["lab"].update(seed=-1), "lab.seed: must be >= 0, got -1"),
    (lambda d: d["lab"].update(timeout_s=0), "lab.timeout_s: must be > 0, got 0"),
    (lambda d: d["lab"].update(timeout_s=float("inf")), "lab.timeout_s: must be a finite number"),
    # [data]
    (lambda d: d["data"].update(source="data.parquet"), 'data.source: must be digits, synthetic:'),
    (lambda d: d["data"].update(source="absent.npz"), "data.source: "),
    (lambda d: d["data"].update(partition="magic:1"), "data.partition: unknown partitioner 'magic:1'"),
    (lambda d: d["data"].update(test_fraction=1.0), "data.test_fraction: must be < 1, got 1.0"),
    (lambda d: d["data"].update(test_fraction=0), "data.test_fraction: must be > 0, got 0"),
    (lambda d: d["data"].update(source="synthetic:0.5,0.5,4"), "data: partition does not apply to synthetic"),
    (lambda d: d.update(data={"source": "synthetic:0.5,0.5,4", "test_fraction": 0.1}),
     "data: test_fraction does not apply to synthetic"),
    (lambda d: d.update(data={"source": "synthetic:0.5,0.5"}),
     "data.source: 'synthetic:0.5,0.5' comes split over its own 30 devices but the lab has 4"),
    (lambda d: d.update(data={"source": "synthetic:0.5,x,4"}), "data.source: data 'synthetic:0.5,x,4': beta"),
    # [[group]]
    (lambda d: d.pop("group"), "group: required: at least one [[group]] table"),
    (lambda d: d.update(group=[]), "group: needs at least 1 entry"),
    (lambda d: d["group"][0].update(arch="riscv"),
     "group[0].arch: must be 'amd64' or 'arm64', got \"riscv\""),
    (lambda d: d["group"][0].update(name="Pi"), "group[0].name: must be a lowercase letter"),
    (lambda d: d["group"][0].update(name="a-b"), "group[0].name: must be a lowercase letter"),
    (lambda d: d["group"][2].update(name="pi"), "group[2].name: 'pi' is already the name of group[0]"),
    (lambda d: d["group"][0].update(count=0), "group[0].count: must be >= 1, got 0"),
    (lambda d: d["group"][0].update(count="2"), 'group[0].count: must be an integer, got "2"'),
    (lambda d: d["group"][0].update(count=1.5), "group[0].count: must be an integer, got 1.5"),
    (lambda d: d["group"][0].update(cpus=0), "group[0].cpus: must be > 0, got 0"),
    (lambda d: d["group"][0].update(cpus=(os.cpu_count() or 1) + 1),
     "group[0].cpus: must be at most the host's"),
    (lambda d: d["group"][0].update(cpus="1"), "group[0].cpus: must be a number"),
    (lambda d: d["group"][0].update(memory="64m"), 'group[0].memory: must be at least 96m (a Python agent'),
    (lambda d: d["group"][0].update(memory="lots"), 'group[0].memory: must be a size such as "64m"'),
    (lambda d: d["group"][0].update(memory=-5), "group[0].memory: must be > 0, got -5"),
    (lambda d: d["group"][0].update(disk="8m"), "group[0].disk: must be at least 16m"),
    (lambda d: d["group"][0].update(policy={"max_cpu_load": 2}),
     "group[0].policy: max_cpu_load must be between"),
    (lambda d: d["group"][0].update(policy=3), "group[0].policy: must be a table"),
    (lambda d: d["group"][1]["link"].update(rate="0"), 'group[1].link.rate: must be > 0, got "0"'),
    (lambda d: d["group"][1]["link"].update(rate="1mbps"), "group[1].link.rate: must be a rate such as"),
    (lambda d: d["group"][1]["link"].update(loss=0.5), "group[1].link.loss: must be < 0.5, got 0.5"),
    (lambda d: d["group"][1]["link"].update(loss=-0.1), "group[1].link.loss: must be >= 0, got -0.1"),
    (lambda d: d["group"][1]["link"].update(outages=[{"at_s": 1.0, "for_s": 0}]),
     "group[1].link.outages[0].for_s: must be > 0, got 0"),
    (lambda d: d["group"][1]["link"].update(outages=[{"at_s": -1.0, "for_s": 3}]),
     "group[1].link.outages[0].at_s: must be >= 0"),
    (lambda d: d["group"][1]["link"].update(outages=[{"at_s": 1800.0, "for_s": 3}]),
     "group[1].link.outages[0].at_s: 1800 is past lab.timeout_s (1800)"),
    (lambda d: d["group"][1]["link"].update(outages={"at_s": 1}), "group[1].link.outages: must be an array"),
    (lambda d: d["group"][2].update(count=249),
     "group: 251 devices in all, more than the 250 one lab may hold"),
    (lambda d: (d["lab"].update(subnet="10.9.9.0/29"), d["group"][2].update(count=4)),
     "group: 6 devices in all, more than the 5 device addresses of lab.subnet 10.9.9.0/29"),
    # [[fault]]
    (lambda d: d["fault"][1].update(target="x86-7"),
     "fault[1].target: 'x86-7' names no device or group; groups: pi"),
    (lambda d: d["fault"][1].update(at_round=6), "fault[1].at_round: 6 is beyond the 5 rounds"),
    (lambda d: d["fault"][1].update(at_round=0), "fault[1].at_round: must be >= 1, got 0"),
    (lambda d: d["fault"][1].update(at_s=3.0), "fault[1]: give exactly one of at_round and at_s"),
    (lambda d: d["fault"][1].pop("at_round"), "fault[1]: give exactly one of at_round and at_s"),
    (lambda d: d["fault"][1].update(at_round="3"), 'fault[1].at_round: must be an integer, got "3"'),
    (lambda d: d["fault"].append({"at_s": -2.0, "action": "kill-coordinator"}),
     "fault[2].at_s: must be >= 0"),
    (lambda d: d["fault"].append({"at_s": 2000.0, "action": "kill-coordinator"}),
     "fault[2].at_s: 2000 is past lab.timeout_s (1800)"),
    (lambda d: d["fault"][1].update(action="explode"), "fault[1].action: must be 'link-down', 'rate'"),
    (lambda d: d["fault"][0].update(target="pi-0"), "fault[0]: target does not apply to kill-coordinator"),
    (lambda d: d["fault"][1].pop("target"), "fault[1]: link-down needs a target"),
    (lambda d: d["fault"][1].pop("for_s"), "fault[1]: link-down needs for_s"),
    (lambda d: d["fault"][1].update(for_s=0), "fault[1].for_s: must be > 0, got 0"),
    (lambda d: d["fault"][0].update(for_s=3.0), "fault[0]: for_s does not apply to kill-coordinator"),
    (lambda d: d["fault"][1].update(action="rate"), "fault[1]: action rate needs rate"),
    (lambda d: d["fault"][1].update(action="rate", rate="-256kbit"),
     'fault[1].rate: must be > 0, got "-256kbit"'),
    (lambda d: d["fault"][1].update(rate="1mbit"), "fault[1]: rate applies to action rate only"),
    (lambda d: d["fault"][1].update(restart=False),
     "fault[1]: restart and restart_after_s apply to kill-agent"),
    (lambda d: d["fault"][0].update(restart=1), "fault[0].restart: must be true or false, got 1"),
    (lambda d: d["fault"][0].update(restart_after_s=-1), "fault[0].restart_after_s: must be >= 0"),
    (lambda d: d["fault"][0].update(restart=False, restart_after_s=3.0),
     "fault[0]: restart_after_s does not apply with restart = false"),
    (lambda d: d["fault"][1].update(size="1m"), "fault[1]: size applies to fill-disk and fill-memory"),
    (lambda d: d["fault"].append({"at_round": 2, "action": "fill-disk", "target": "x86", "for_s": 5,
                                  "size": "65m"}),
     "fault[2].size: 65m is more than device x86-0's disk (64m)"),
    (lambda d: d["fault"].append({"at_round": 2, "action": "fill-memory", "target": "pi-0", "for_s": 5,
                                  "size": "1g"}),
     "fault[2].size: 1g is more than device pi-0's memory (384m)"),
    (lambda d: d["fault"].append({"at_round": 2, "action": "fill-disk", "target": "x86", "for_s": 5,
                                  "size": "0m"}), 'fault[2].size: must be > 0, got "0m"'),
    # [federation]
    (lambda d: d["federation"]["strategy"].update(name="fedbogus"),
     "federation: unknown strategy 'fedbogus'"),
    (lambda d: d["federation"]["task"].update(name="nope"), "federation.task.name: unknown task 'nope'"),
    (lambda d: d["federation"]["rounds"].update(count=0), "federation: rounds must be >= 1, got 0"),
    (lambda d: d["federation"]["rounds"].update(min_updates=2),
     "federation: [secagg] needs at least 3 updates"),
    (lambda d: d["federation"].update(rounds=5), "federation.rounds: must be a table, got 5"),
    (lambda d: d["federation"]["rounds"].update(cohort_size=5),
     "federation.rounds.cohort_size: 5 is more than the lab's 4 devices"),
    (lambda d: d["federation"]["rounds"].pop("cohort_size"),
     "federation.rounds.cohort_size: 8 (the default) is more than the lab's 4 devices"),
    (lambda d: d["federation"]["rounds"].update(min_devices=5),
     "federation.rounds.min_devices: 5 is more than the lab's 4 devices"),
    (lambda d: d["federation"].update(server={"host": "0.0.0.0"}), "federation.server.host: the lab sets it"),
    (lambda d: d["federation"].update(server={"port": 1}), "federation.server.port: the lab sets it"),
    (lambda d: d["federation"].update(server={"data_dir": "x"}),
     "federation.server.data_dir: the lab sets it"),
    (lambda d: d["federation"]["task"].update(eval_data="t.npz"),
     "federation.task.eval_data: the lab sets it"),
    (lambda d: d["federation"]["task"].update(num_features=3),
     "federation.task.num_features: the lab sets it"),
    (lambda d: d["federation"].update(security={"insecure": True}), "federation.security.insecure: the lab"),
]


@pytest.mark.parametrize(("change", "message"), BAD_VALUES)
def test_bad_values_are_refused(change: Callable[[dict[str, Any]], object], message: str) -> None:
    assert message in refused(change)


def test_the_device_count_boundaries_are_allowed() -> None:
    data = ci()
    data["group"][2]["count"] = 248
    assert len(parse(data).devices()) == 250
    data = ci()
    data["group"][2]["count"] = 2
    data["lab"]["subnet"] = "10.9.9.0/29"  # 5 device addresses; the lab has 4
    assert len(parse(data).devices()) == 4


def test_more_devices_than_the_data_can_feed(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "few.npz", x=rng.normal(size=(10, 4)), y=np.arange(10) % 2)
    data = ci()
    data["data"]["source"] = "few.npz"
    data["group"][2]["count"] = 7  # 9 devices, 8 training examples after the 0.2 test split
    message = refused(lambda d: d.update(data=data["data"], group=data["group"]), base_dir=tmp_path)
    assert message.startswith("data.source: ")
    assert "9 devices but only 8 training examples" in message


def test_synthetic_data_with_the_lab_s_count_loads() -> None:
    data = ci()
    data["data"] = {"source": "synthetic:0.5,0.5,4"}
    spec = parse(data)
    assert spec.data.effective_partition is None
    assert spec.federation_config.rounds == 5


def test_load_spec_refuses_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lab spec .*absent\.toml: no such file"):
        load_spec(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[lab\nname = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_spec(bad)


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(CI.read_text().replace('arch = "arm64"', 'arch = "mips"', 1))
    with pytest.raises(ConfigError) as e:
        load_spec(path)
    assert str(e.value) == f"lab spec {path}: group[0].arch: must be 'amd64' or 'arm64', got \"mips\""


def test_spec_is_frozen() -> None:
    spec = load_spec(CI)
    with pytest.raises(ValueError, match="frozen"):
        spec.lab.name = "other"
    assert copy.deepcopy(spec.lab) == spec.lab

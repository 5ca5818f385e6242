"""The lab's state file, names and addresses, the commands :class:`Host` runs (through a recording
fake runner) and teardown's order and error collection. The real thing is tests/e2e/test_lab_host.py."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from fedge.errors import ConfigError, FedgeError
from fedge.lab.host import (
    Completed,
    Host,
    LabError,
    LabState,
    bridge_name,
    container_name,
    lab_dir,
    leftovers,
    netns_name,
    run_command,
    state_path,
    subnet_addresses,
    teardown,
    validate_lab_name,
    veth_names,
)


class FakeRunner:
    """Records every command; answers from rules (the newest matching rule wins, default: success).

    A rule matches when its tokens appear, in order and contiguous, in the command.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.envs: list[Mapping[str, str] | None] = []
        self.rules: list[tuple[tuple[str, ...], int, str, str]] = []
        # By default nothing exists yet: the host is clean.
        self.answer("link", "show", rc=1, err='Device "x" does not exist.')
        self.answer("findmnt", rc=1)
        self.answer("podman", "container", "exists", rc=1)
        self.answer("iptables", "-w", "-C", rc=1, err="Bad rule (does a matching rule exist in that chain?)")

    def answer(self, *tokens: str, rc: int = 0, out: str = "", err: str = "") -> None:
        self.rules.append((tokens, rc, out, err))

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Completed:
        args = tuple(argv)
        self.calls.append(args)
        self.envs.append(env)
        for tokens, rc, out, err in reversed(self.rules):
            n = len(tokens)
            if any(args[i:i + n] == tokens for i in range(len(args) - n + 1)):
                return Completed(args, rc, out, err)
        return Completed(args, 0, "", "")

    def changes(self) -> list[str]:
        """The commands that change something (not the queries), as strings."""
        queries = ("link show", "netns list", "findmnt", "container exists", "-C ", "qdisc show",
                   "route show", "addr show")
        return [" ".join(c) for c in self.calls if not any(q in " ".join(c) for q in queries)]


# Without IPv6 in the kernel there is nothing to disable, and no sysctl runs.
IPV6 = Path("/proc/sys/net/ipv6").exists()


def _v6(commands: list[str]) -> list[str]:
    return [c for c in commands if IPV6 or "disable_ipv6" not in c]


@pytest.fixture
def fake() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def state(tmp_path: Path) -> LabState:
    return LabState.create(state_path("t1", root=tmp_path), lab="t1", created=1.0)


def _lab(state: LabState, fake: FakeRunner) -> Host:
    """A host with the bridge and one device's namespace and veth made."""
    host = Host(state, run=fake)
    host.bridge("flt1br", "10.213.0.1/24")
    host.netns("fedge-t1-pi-0")
    host.veth("flt1000h", "flt1000d", netns="fedge-t1-pi-0", bridge="flt1br", address_cidr="10.213.0.2/24")
    fake.calls.clear()
    return host


# --- names and addresses ---------------------------------------------------------------------
def test_names_follow_the_lab_name() -> None:
    assert bridge_name("ci") == "flcibr"
    assert veth_names("ci", 7) == ("flci007h", "flci007d")
    assert veth_names("abcdef", 999) == ("flabcdef999h", "flabcdef999d")
    assert all(len(n) <= 15 for n in veth_names("abcdef", 999))
    assert netns_name("ci", "pi-0") == "fedge-ci-pi-0"
    assert container_name("ci", "pi-0") == "fedge-lab-ci-pi-0"
    assert lab_dir("ci", root=Path("/x")) == Path("/x/ci")
    assert state_path("ci", root=Path("/x")) == Path("/x/ci/state.json")


@pytest.mark.parametrize("bad", ["", "abcdefg", "Ci", "c-i", "c_i", "c i", "é", 7])
def test_bad_lab_names_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="lab name"):
        validate_lab_name(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1000, True, "1", 1.0])
def test_bad_device_indices_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="device index"):
        veth_names("ci", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "0pi", "Pi-0", "pi_0", "pi 0", "p" * 33, "pi/0"])
def test_bad_device_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="device name"):
        netns_name("ci", bad)
    with pytest.raises(ConfigError, match="device name"):
        container_name("ci", bad)


def test_subnet_addresses_give_the_bridge_dot_1_and_devices_from_dot_2() -> None:
    assert subnet_addresses("10.213.0.0/24", 3) == ("10.213.0.1/24", ["10.213.0.2/24", "10.213.0.3/24",
                                                                      "10.213.0.4/24"])
    assert subnet_addresses("192.168.7.0/29", 5)[1][-1] == "192.168.7.6/29"
    assert subnet_addresses("172.16.0.0/12", 1)[0] == "172.16.0.1/12"


@pytest.mark.parametrize(("subnet", "count", "message"), [
    ("8.8.8.0/24", 1, "must lie in"),
    ("172.32.0.0/24", 1, "must lie in"),
    ("10.213.0.1/24", 1, "not an IPv4 network"),  # host bits set
    ("fd00::/64", 1, "must be IPv4"),
    ("nonsense", 1, "not an IPv4 network"),
    ("10.213.0.0/29", 6, "room for 5 devices, not 6"),
    ("10.213.0.0/31", 1, "room for 0 devices"),
    ("10.213.0.0/24", 0, "device count"),
    ("10.213.0.0/24", 1001, "device count"),
    ("10.213.0.0/24", True, "device count"),
])
def test_bad_subnets_are_refused(subnet: str, count: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        subnet_addresses(subnet, count)


# --- the state file --------------------------------------------------------------------------
def test_the_state_file_is_written_on_every_change_and_reads_back(state: LabState) -> None:
    bridge = state.add("bridge", name="flt1br", address="10.213.0.1/24")
    proc = state.add("process", pid=42, start_time=9)
    qdisc = state.add("qdisc", dev="flt1000h", netns=None)
    loaded = LabState.load(state.path)
    assert loaded.lab == "t1" and loaded.created == 1.0
    assert loaded.resources() == [bridge, proc, qdisc]
    assert loaded.resources()[1].integer("pid") == 42 and loaded.resources()[2].optional_text("netns") is None
    state.discard(proc)
    assert [r.kind for r in LabState.load(state.path).resources()] == ["bridge", "qdisc"]
    # Ids are never reused, even after a reload: a resource is known by its id.
    again = LabState.load(state.path)
    assert again.add("netns", name="fedge-t1-a").id == 4
    raw = json.loads(state.path.read_text())
    assert raw["format"] == "fedge-lab-state" and raw["lab"] == "t1"
    assert raw["resources"][0] == {"kind": "bridge", "id": 1, "name": "flt1br", "address": "10.213.0.1/24"}


def test_a_failed_write_leaves_the_previous_state_file_whole(state: LabState) -> None:
    state.add("netns", name="fedge-t1-a")
    assert not list(state.path.parent.glob(".*tmp"))  # written by rename: no temporary file stays
    (state.path.parent / f".{state.path.name}.tmp").mkdir()  # the next write cannot open its temp file
    with pytest.raises(OSError):
        state.add("netns", name="fedge-t1-b")
    assert [r.text("name") for r in LabState.load(state.path).resources()] == ["fedge-t1-a"]


def test_create_refuses_an_existing_state_file(state: LabState) -> None:
    with pytest.raises(LabError, match="already exists"):
        LabState.create(state.path, lab="t1")
    with pytest.raises(ConfigError, match="lab name"):
        LabState.create(state.path.parent / "other.json", lab="T1")


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a readable fedge lab state file"),
    (b"{not json", "not a readable fedge lab state file"),
    (b"\xff\xfe", "not a readable fedge lab state file"),
    (b"[]", "not a fedge lab state file"),
    (b'{"lab": "t1", "created": 1, "resources": []}', "not a fedge lab state file"),
    (b'{"format": "podman", "version": 1}', "not a fedge lab state file"),
    (b'{"format": "fedge-lab-state", "version": 2, "lab": "t1", "created": 1, "resources": []}', "version 2"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "T-1", "created": 1, "resources": []}', "lab name"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": "x", "resources": []}', "created"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1, "resources": {}}', "resources"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1, "resources": [1]}',
     "not an object"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1,'
     b' "resources": [{"kind": "route", "id": 1}]}', "unknown resource kind 'route'"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1,'
     b' "resources": [{"kind": "netns", "id": 1}]}', "needs fields name"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1,'
     b' "resources": [{"kind": "netns", "id": 0, "name": "x"}]}', "id 0"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1,'
     b' "resources": [{"kind": "netns", "id": 1, "name": 5}]}', "wrong type"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1,'
     b' "resources": [{"kind": "process", "id": 1, "pid": true, "start_time": 1}]}', "wrong type"),
    (b'{"format": "fedge-lab-state", "version": 1, "lab": "t1", "created": 1,'
     b' "resources": [{"kind": "netns", "id": 1, "name": "x", "extra": 1}]}', "needs fields name"),
])
def test_a_foreign_or_corrupt_state_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(LabError, match=re.escape(message)):
        LabState.load(path)


def test_a_missing_state_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="no lab state file"):
        LabState.load(tmp_path / "state.json")


def test_add_and_discard_refuse_what_they_cannot_record(state: LabState) -> None:
    with pytest.raises(LabError, match="unknown resource kind 'route'"):
        state.add("route", dest="0.0.0.0/0")
    with pytest.raises(LabError, match="needs fields"):
        state.add("veth", host_end="flt1000h")
    with pytest.raises(LabError, match="wrong type"):
        state.add("process", pid="42", start_time=1)
    gone = state.add("netns", name="fedge-t1-a")
    state.discard(gone)
    with pytest.raises(LabError, match="not recorded"):
        state.discard(gone)
    assert state.resources() == []


# --- commands --------------------------------------------------------------------------------
def test_a_bridge_is_recorded_then_made_with_its_address(state: LabState, fake: FakeRunner) -> None:
    Host(state, run=fake).bridge("flt1br", "10.213.0.1/24")
    assert fake.changes() == _v6([
        "ip link add name flt1br type bridge",
        "sysctl -qw net.ipv6.conf.flt1br.disable_ipv6=1",
        "ip addr add 10.213.0.1/24 dev flt1br",
        "ip link set dev flt1br up",
    ])
    assert [r.describe() for r in LabState.load(state.path).resources()] == ["bridge flt1br/10.213.0.1/24"]


@pytest.mark.parametrize(("name", "address", "message"), [
    ("flt2br", "10.213.0.1/24", "must be 'flt1br'"),
    ("eth0", "10.213.0.1/24", "must be 'flt1br'"),
    ("flt1br", "8.8.8.1/24", "must lie in"),
    ("flt1br", "10.213.0.0/24", "network or broadcast"),
    ("flt1br", "10.213.0.255/24", "network or broadcast"),
    ("flt1br", "10.213.0.1/31", "prefix at most /30"),
    ("flt1br", "10.213.0.1", "with a prefix"),
    ("flt1br", "fd00::1/64", "must be IPv4"),
    ("flt1br", "10.213.0.300/24", "not an address"),
])
def test_bad_bridges_are_refused_before_anything_is_recorded(state: LabState, fake: FakeRunner, name: str,
                                                             address: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Host(state, run=fake).bridge(name, address)
    assert state.resources() == [] and fake.changes() == []


def test_a_subnet_the_host_already_uses_is_refused(state: LabState, fake: FakeRunner) -> None:
    fake.answer("route", "show", out="default via 192.168.1.1 dev eth0\n10.0.0.0/8 dev eth0 scope link\n")
    with pytest.raises(LabError, match=r"overlaps 10\.0\.0\.0/8"):
        Host(state, run=fake).bridge("flt1br", "10.213.0.1/24")
    fake.answer("route", "show", out="default via 192.168.1.1 dev eth0\n")
    fake.answer("addr", "show", out="2: eth0    inet 10.213.0.77/16 brd 10.213.255.255 scope global eth0\n")
    with pytest.raises(LabError, match=r"overlaps 10\.213\.0\.0/16"):
        Host(state, run=fake).bridge("flt1br", "10.213.0.1/24")
    assert state.resources() == [] and fake.changes() == []


def test_an_existing_link_or_namespace_is_never_taken_over(state: LabState, fake: FakeRunner) -> None:
    fake.answer("link", "show", "dev", "flt1br", rc=0, out="5: flt1br: <BROADCAST>")
    with pytest.raises(LabError, match="flt1br already exists"):
        Host(state, run=fake).bridge("flt1br", "10.213.0.1/24")
    fake.answer("netns", "list", out="fedge-t1-pi-0 (id: 3)\nother\n")
    with pytest.raises(LabError, match="fedge-t1-pi-0 already exists"):
        Host(state, run=fake).netns("fedge-t1-pi-0")
    assert state.resources() == [] and fake.changes() == []


@pytest.mark.parametrize(("name", "message"), [("fedge-t2-pi-0", "must be named fedge-t1-"),
                                               ("pi-0", "must be named"), ("fedge-t1-Pi", "device name")])
def test_bad_namespace_names_are_refused(state: LabState, fake: FakeRunner, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Host(state, run=fake).netns(name)
    assert state.resources() == []


def test_a_veth_joins_the_bridge_and_the_namespace_without_ipv6(state: LabState, fake: FakeRunner) -> None:
    host = Host(state, run=fake)
    host.bridge("flt1br", "10.213.0.1/24")
    host.netns("fedge-t1-pi-0")
    fake.calls.clear()
    host.veth("flt1000h", "flt1000d", netns="fedge-t1-pi-0", bridge="flt1br", address_cidr="10.213.0.2/24")
    assert fake.changes() == _v6([
        "ip link add name flt1000h type veth peer name flt1000d netns fedge-t1-pi-0",
        "sysctl -qw net.ipv6.conf.flt1000h.disable_ipv6=1",
        "ip netns exec fedge-t1-pi-0 sysctl -qw net.ipv6.conf.flt1000d.disable_ipv6=1",
        "ip link set dev flt1000h master flt1br",
        "ip link set dev flt1000h type bridge_slave flood off mcast_flood off",
        "ip -n fedge-t1-pi-0 addr add 10.213.0.2/24 dev flt1000d",
        "ip link set dev flt1000h up",
        "ip -n fedge-t1-pi-0 link set dev flt1000d up",
        "ip -n fedge-t1-pi-0 link set dev lo up",
    ])
    assert [r.kind for r in LabState.load(state.path).resources()] == ["bridge", "netns", "veth"]
    assert not any("route" in c and "add" in c for c in fake.changes())  # no route, no NAT, ever


@pytest.mark.parametrize(("ends", "netns", "bridge", "address", "error", "message"), [
    (("flt1001h", "flt1002d"), "fedge-t1-pi-0", "flt1br", "10.213.0.3/24", ConfigError, "must be a pair"),
    (("eth0h", "eth0d"), "fedge-t1-pi-0", "flt1br", "10.213.0.3/24", ConfigError, "not one of lab 't1'"),
    (("flt11h", "flt11d"), "fedge-t1-pi-0", "flt1br", "10.213.0.3/24", ConfigError, "not one of lab 't1'"),
    (("flt1001h", "flt1001d"), "fedge-t1-pi-9", "flt1br", "10.213.0.3/24", LabError, "not one this lab made"),
    (("flt1001h", "flt1001d"), "fedge-t1-pi-0", "docker0", "10.213.0.3/24", LabError, "not one this lab"),
    (("flt1001h", "flt1001d"), "fedge-t1-pi-0", "flt1br", "10.214.0.3/24", ConfigError, "another address"),
    (("flt1001h", "flt1001d"), "fedge-t1-pi-0", "flt1br", "10.213.0.1/24", ConfigError, "another address"),
    (("flt1001h", "flt1001d"), "fedge-t1-pi-0", "flt1br", "10.213.0.3/16", ConfigError, "another address"),
    (("flt1001h", "flt1001d"), "fedge-t1-pi-0", "flt1br", "10.213.0.2/24", ConfigError, "already flt1000d's"),
])
def test_bad_veths_are_refused(state: LabState, fake: FakeRunner, ends: tuple[str, str], netns: str,
                               bridge: str, address: str, error: type[Exception], message: str) -> None:
    host = _lab(state, fake)
    before = state.resources()
    with pytest.raises(error, match=message):
        host.veth(*ends, netns=netns, bridge=bridge, address_cidr=address)
    assert state.resources() == before and fake.changes() == []


def test_shaping_replaces_a_tbf_on_either_end_and_removes_it(state: LabState, fake: FakeRunner) -> None:
    host = _lab(state, fake)
    first = host.shape("flt1000h", 1_000_000)
    again = host.shape("flt1000h", 256_000)
    assert first == again  # one record per link, however often it is reshaped
    host.shape("flt1000d", 1_000_000, netns="fedge-t1-pi-0")
    host.shape("flt1000h", 10**9)  # a fast link gets a burst of 10 ms at its rate
    assert fake.changes() == [
        "tc qdisc replace dev flt1000h root tbf rate 1000000bit burst 4096b latency 400ms",
        "tc qdisc replace dev flt1000h root tbf rate 256000bit burst 4096b latency 400ms",
        "ip netns exec fedge-t1-pi-0 tc qdisc replace dev flt1000d root tbf rate 1000000bit burst 4096b "
        "latency 400ms",
        "tc qdisc replace dev flt1000h root tbf rate 1000000000bit burst 1250000b latency 400ms",
    ]
    assert len(state.find("qdisc")) == 2
    fake.calls.clear()
    fake.answer("link", "show", "dev", "flt1000h", rc=0)
    fake.answer("qdisc", "show", "dev", "flt1000h", out="qdisc tbf 8001: root refcnt 2 rate 1Gbit\n")
    assert host.shape("flt1000h", None) is None
    assert fake.changes() == ["tc qdisc del dev flt1000h root"]
    assert [r.text("dev") for r in state.find("qdisc")] == ["flt1000d"]
    fake.calls.clear()
    assert host.shape("flt1000h", None) is None  # nothing recorded: nothing to do
    assert fake.changes() == []


@pytest.mark.parametrize(("dev", "rate", "netns", "error", "message"), [
    ("flt1000h", 0, None, ConfigError, "link rate 0"),
    ("flt1000h", -5, None, ConfigError, "link rate -5"),
    ("flt1000h", 1.5e6, None, ConfigError, "link rate"),
    ("flt1000h", True, None, ConfigError, "link rate"),
    ("flt1000h", 10**12, None, ConfigError, "link rate"),
    ("eth0", 1000, None, LabError, "'eth0' is not one this lab made"),
    ("flt1001h", 1000, None, LabError, "not one this lab made"),
    ("flt1000d", 1000, None, LabError, "not in namespace of the host"),
    ("flt1000h", 1000, "fedge-t1-pi-0", LabError, "not in namespace fedge-t1-pi-0"),
])
def test_bad_shaping_is_refused(state: LabState, fake: FakeRunner, dev: str, rate: int, netns: str | None,
                                error: type[Exception], message: str) -> None:
    host = _lab(state, fake)
    with pytest.raises(error, match=message):
        host.shape(dev, rate, netns=netns)
    assert state.find("qdisc") == [] and fake.changes() == []


def test_loss_adds_input_and_output_drop_rules_in_the_namespace(state: LabState, fake: FakeRunner) -> None:
    host = _lab(state, fake)
    made = host.loss("fedge-t1-pi-0", 0.05)
    rule = "-m statistic --mode random --probability 0.05 -m comment --comment fedge-lab-t1 -j DROP"
    assert fake.changes() == [f"ip netns exec fedge-t1-pi-0 iptables -w -A INPUT {rule}",
                              f"ip netns exec fedge-t1-pi-0 iptables -w -A OUTPUT {rule}"]
    assert [r.text("chain") for r in made] == ["INPUT", "OUTPUT"]
    fake.calls.clear()
    fake.answer("netns", "list", out="fedge-t1-pi-0\n")
    fake.answer("iptables", "-w", "-C", rc=0)
    assert host.loss("fedge-t1-pi-0", 0) == []
    assert fake.changes() == [f"ip netns exec fedge-t1-pi-0 iptables -w -D INPUT {rule}",
                              f"ip netns exec fedge-t1-pi-0 iptables -w -D OUTPUT {rule}"]
    assert state.find("iptables") == []


@pytest.mark.parametrize(("netns", "p", "error", "message"), [
    ("fedge-t1-pi-0", 1.0, ConfigError, "loss probability 1.0"),
    ("fedge-t1-pi-0", -0.1, ConfigError, "loss probability -0.1"),
    ("fedge-t1-pi-0", float("nan"), ConfigError, "loss probability nan"),
    ("fedge-t1-pi-0", True, ConfigError, "loss probability True"),
    ("fedge-t1-pi-0", "0.1", ConfigError, "loss probability '0.1'"),
    ("fedge-t1-pi-9", 0.1, LabError, "not one this lab made"),
])
def test_bad_loss_is_refused(state: LabState, fake: FakeRunner, netns: str, p: float,
                             error: type[Exception], message: str) -> None:
    host = _lab(state, fake)
    with pytest.raises(error, match=message):
        host.loss(netns, p)
    assert state.find("iptables") == [] and fake.changes() == []


def test_links_go_down_and_up_where_they_are(state: LabState, fake: FakeRunner) -> None:
    host = _lab(state, fake)
    host.link("flt1000h", False)
    host.link("flt1000h", True)
    host.link("flt1000d", False)
    assert fake.changes() == ["ip link set dev flt1000h down", "ip link set dev flt1000h up",
                              "ip -n fedge-t1-pi-0 link set dev flt1000d down"]
    with pytest.raises(LabError, match="'eth0' is not one this lab made"):
        host.link("eth0", False)
    with pytest.raises(LabError, match="not one this lab made"):
        host.counters("lo")


def test_a_tmpfs_is_sized_and_must_lie_in_the_lab_folder(state: LabState, fake: FakeRunner) -> None:
    host = Host(state, run=fake)
    disk = state.path.parent / "disk" / "pi-0"
    host.tmpfs(disk, 64 << 20)
    assert disk.is_dir()
    assert fake.changes() == [f"mount -t tmpfs -o size={64 << 20},mode=0755 tmpfs {disk}"]
    for bad, message in [(Path("/tmp/elsewhere"), "under"), (Path("disk/pi-1"), "absolute"),
                         (state.path.parent / "disk" / ".." / ".." / "x", "under")]:
        with pytest.raises(ConfigError, match=message):
            host.tmpfs(bad, 1 << 20)
    for size in (0, 4095, True, 1.5e6):
        with pytest.raises(ConfigError, match="tmpfs size"):
            host.tmpfs(state.path.parent / "disk" / "pi-1", size)  # type: ignore[arg-type]
    fake.answer("findmnt", rc=0, out=str(disk))
    with pytest.raises(LabError, match="already a mount point"):
        host.tmpfs(state.path.parent / "disk" / "pi-1", 1 << 20)
    assert [r.kind for r in state.resources()] == ["mount"]


def test_only_lab_containers_and_live_processes_are_recorded(state: LabState, fake: FakeRunner) -> None:
    host = Host(state, run=fake)
    assert host.record_container("fedge-lab-t1-pi-0").text("name") == "fedge-lab-t1-pi-0"
    for bad in ("fedge-lab-t2-pi-0", "postgres", "fedge-lab-t1-"):
        with pytest.raises(ConfigError):
            host.record_container(bad)
    for pid in (0, 1, -3, True):
        with pytest.raises(ConfigError, match="pid"):
            host.record_process(pid)
    with pytest.raises(LabError, match="not running"):
        host.record_process(2**22 + 17)  # above the kernel's pid_max
    with pytest.raises(ConfigError, match="absolute"):
        host.record_file(Path("relative.txt"))
    assert [r.kind for r in state.resources()] == ["container"]


def test_a_failed_command_names_itself_and_its_error_on_one_line(state: LabState, fake: FakeRunner) -> None:
    fake.answer("ip", "link", "add", rc=2, err="RTNETLINK answers: Operation not permitted\n  more\n")
    with pytest.raises(LabError) as caught:
        Host(state, run=fake).bridge("flt1br", "10.213.0.1/24")
    assert str(caught.value) == ("ip link add name flt1br type bridge failed (exit 2): "
                                 "RTNETLINK answers: Operation not permitted more")
    assert isinstance(caught.value, FedgeError)
    # It was recorded first, so teardown would remove whatever the failed command half made.
    assert [r.kind for r in state.resources()] == ["bridge"]


def test_the_real_runner_reports_status_output_and_missing_programs() -> None:
    done = run_command(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert run_command(["sh", "-c", "echo $FEDGE_X"], env={"FEDGE_X": "42"}).stdout == "42\n"
    with pytest.raises(LabError, match="no-such-program-here: command not found"):
        run_command(["no-such-program-here"])


# --- teardown --------------------------------------------------------------------------------
@pytest.fixture
def everything(state: LabState, tmp_path: Path) -> Iterator[LabState]:
    """A state file recording one resource of every kind (the process is not running)."""
    (tmp_path / "token").write_text("x")
    state.add("bridge", name="flt1br", address="10.213.0.1/24")
    state.add("netns", name="fedge-t1-pi-0")
    state.add("veth", host_end="flt1000h", device_end="flt1000d", netns="fedge-t1-pi-0",
              address="10.213.0.2/24")
    state.add("qdisc", dev="flt1000d", netns="fedge-t1-pi-0")
    state.add("iptables", netns="fedge-t1-pi-0", chain="INPUT", probability="0.05")
    state.add("mount", path=str(tmp_path / "disk"))
    state.add("file", path=str(tmp_path / "token"))
    state.add("container", name="fedge-lab-t1-pi-0")
    state.add("process", pid=2**22 + 17, start_time=1)
    yield state


def _all_present(fake: FakeRunner) -> None:
    fake.answer("link", "show", rc=0)
    fake.answer("netns", "list", out="fedge-t1-pi-0 (id: 0)\n")
    fake.answer("findmnt", rc=0)
    fake.answer("podman", "container", "exists", rc=0)
    fake.answer("iptables", "-w", "-C", rc=0)
    fake.answer("qdisc", "show", out="qdisc tbf 8001: root refcnt 2 rate 1Mbit burst 4Kb lat 400ms\n")


def test_teardown_removes_everything_newest_first(everything: LabState, fake: FakeRunner,
                                                  tmp_path: Path) -> None:
    _all_present(fake)
    report = teardown(everything, run=fake)
    rule = "-m statistic --mode random --probability 0.05 -m comment --comment fedge-lab-t1 -j DROP"
    assert fake.changes() == [
        "podman rm -f -t 0 fedge-lab-t1-pi-0",
        f"umount -l {tmp_path / 'disk'}",
        f"ip netns exec fedge-t1-pi-0 iptables -w -D INPUT {rule}",
        "ip netns exec fedge-t1-pi-0 tc qdisc del dev flt1000d root",
        "ip link del dev flt1000h",
        "ip netns del fedge-t1-pi-0",
        "ip link del dev flt1br",
    ]
    podman = [env for call, env in zip(fake.calls, fake.envs, strict=True) if call[0] == "podman"]
    assert podman and all(env and env["CONTAINERS_CONF"].endswith("deploy/podman/containers.conf")
                          for env in podman)
    assert not (tmp_path / "token").exists()
    assert report.ok and report.state_deleted and not everything.path.exists()
    assert report.already_gone == ("process 4194321",)  # not running: nothing was killed
    assert len(report.removed) == 8


def test_teardown_tolerates_what_is_already_gone(everything: LabState, fake: FakeRunner,
                                                 tmp_path: Path) -> None:
    (tmp_path / "token").unlink()
    report = teardown(everything, run=fake)  # the fake host has nothing: all was removed by hand
    assert fake.changes() == []
    assert report.ok and report.removed == () and len(report.already_gone) == 9
    assert not everything.path.exists()


def test_teardown_goes_on_past_failures_and_keeps_what_is_left(everything: LabState,
                                                               fake: FakeRunner) -> None:
    _all_present(fake)
    fake.answer("podman", "rm", rc=125, err="Error: cannot remove container: device busy")
    fake.answer("ip", "netns", "del", rc=1, err="Cannot remove namespace file: Device or resource busy")
    report = teardown(everything, run=fake)
    assert not report.ok and not report.state_deleted
    assert report.failures == (
        "container fedge-lab-t1-pi-0: podman rm -f -t 0 fedge-lab-t1-pi-0 failed (exit 125): "
        "Error: cannot remove container: device busy",
        "netns fedge-t1-pi-0: ip netns del fedge-t1-pi-0 failed (exit 1): "
        "Cannot remove namespace file: Device or resource busy",
    )
    assert "ip link del dev flt1br" in fake.changes()  # the bridge, made first, still went
    left = LabState.load(everything.path)
    assert [r.kind for r in left.resources()] == ["netns", "container"]
    # A later `fedge lab down` retries just those and then deletes the state file.
    retry = FakeRunner()
    _all_present(retry)
    again = teardown(left, run=retry)
    assert again.ok and again.state_deleted and not everything.path.exists()
    assert retry.changes() == ["podman rm -f -t 0 fedge-lab-t1-pi-0", "ip netns del fedge-t1-pi-0"]


def test_rules_and_qdiscs_go_with_their_namespace(state: LabState, fake: FakeRunner) -> None:
    state.add("qdisc", dev="flt1000d", netns="fedge-t1-pi-0")
    state.add("iptables", netns="fedge-t1-pi-0", chain="OUTPUT", probability="0.1")
    fake.answer("iptables", rc=2, err="should not be asked")
    report = teardown(state, run=fake)  # `ip netns list` is empty: the namespace is gone
    assert report.ok and len(report.already_gone) == 2
    assert not any("iptables" in c or c[0] == "tc" for c in fake.calls)


def test_teardown_kills_a_recorded_process_but_never_a_recycled_pid(state: LabState,
                                                                    fake: FakeRunner) -> None:
    ours = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        host = Host(state, run=fake)
        host.record_process(ours.pid)
        real = host.record_process(other.pid)
        # Pretend `other`'s pid was recycled: the recorded start time is not the running process's.
        state.discard(real)
        state.add("process", pid=other.pid, start_time=real.integer("start_time") - 1)
        report = teardown(state, run=fake)
        assert report.ok and report.removed == (f"process {ours.pid}",)
        assert report.already_gone == (f"process {other.pid}",)
        assert ours.wait(5) == -9
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()
        ours.kill()
        ours.wait()


def test_leftovers_finds_a_lab_by_name_and_only_that_lab(tmp_path: Path, fake: FakeRunner) -> None:
    fake.answer("netns", "list", out="fedge-t1-pi-0 (id: 1)\nfedge-t11-pi-0\nfedge-t1x\n")
    fake.answer("podman", "ps", out="fedge-lab-t1-pi-0\nfedge-lab-t11-pi-0\nweb\n")
    fake.answer("iptables", "-w", "-S", out="-P INPUT ACCEPT\n"
                "-A INPUT -m comment --comment fedge-lab-t1 -j DROP\n"
                "-A INPUT -m comment --comment fedge-lab-t11 -j DROP\n")
    assert leftovers("t1", root=tmp_path, run=fake) == [
        "netns fedge-t1-pi-0", "container fedge-lab-t1-pi-0",
        "iptables -A INPUT -m comment --comment fedge-lab-t1 -j DROP",
    ]
    fake.answer("podman", "ps", rc=125, err="Error: database is locked")
    assert leftovers("t1", root=tmp_path, run=fake)[1] == (
        "container: podman ps -a --format '{{.Names}}' failed (exit 125): Error: database is locked")
    with pytest.raises(ConfigError, match="lab name"):
        leftovers("T1", root=tmp_path, run=fake)


def test_teardown_reports_what_it_cannot_even_check_or_delete(state: LabState, fake: FakeRunner,
                                                              tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "inside").write_text("x")
    state.add("file", path=str(full))  # a folder that is not empty cannot be deleted as a file
    state.add("container", name="fedge-lab-t1-pi-0")
    state.add("mount", path=str(tmp_path / "disk"))
    fake.answer("podman", "container", "exists", rc=125, err="Error: cannot connect to Podman")
    fake.answer("findmnt", rc=2, err="findmnt: bad usage")
    report = teardown(state, run=fake)
    assert [f.split(":")[0] for f in report.failures] == [f"mount {tmp_path / 'disk'}",
                                                          "container fedge-lab-t1-pi-0", f"file {full}"]
    assert "Error: cannot connect to Podman" in report.failures[1]
    assert "cannot delete" in report.failures[2]
    assert len(LabState.load(state.path).resources()) == 3 and not report.state_deleted


def test_counters_of_a_link_that_is_gone_are_an_error(state: LabState, fake: FakeRunner) -> None:
    state.add("bridge", name="flt1br", address="10.213.0.1/24")  # recorded, never made
    with pytest.raises(LabError, match="cannot read the counters of flt1br"):
        Host(state, run=fake).counters("flt1br")

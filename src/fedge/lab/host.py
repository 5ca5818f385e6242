"""The lab's host resources and their teardown.

A lab makes a bridge, one network namespace per device, a veth pair per
device, tbf qdiscs, iptables loss rules, tmpfs state dirs, containers and a
coordinator process. Each is recorded in the lab's state file
(:mod:`fedge.lab.state`) *before* it is made and dropped from it only once it
is gone, and the file is rewritten atomically on every change; so whenever the
lab dies (an error, Ctrl-C, ``kill -9``, a power cut during setup),
:func:`teardown` finds everything it may have left and removes exactly that,
tolerating what is already gone.

Safety: the lab only ever deletes what its state file lists, refuses to make
a resource whose name already exists (so it can never record, and later
delete, something it did not create), names everything after the lab
(``fl<lab>br``, ``fl<lab><iii>h``/``d``, ``fedge-<lab>-<device>``,
``fedge-lab-<lab>-<device>``), uses private IPv4 subnets that overlap no
address or route of the host, and adds no route, NAT or default gateway.
:func:`leftovers` looks at the host itself, not at the state file, to prove
that a torn-down lab left nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedge.errors import ConfigError
from fedge.lab.state import (
    KINDS,
    LAB_ROOT,
    LabError,
    LabState,
    Resource,
    lab_dir,
    state_path,
    validate_lab_name,
)

__all__ = [
    "KINDS", "LAB_ROOT", "Completed", "Counters", "Host", "LabError", "LabState", "Resource", "Runner",
    "TeardownReport", "bridge_name", "container_name", "lab_dir", "leftovers", "netns_name", "run_command",
    "state_path", "subnet_addresses", "teardown", "validate_lab_name", "veth_names",
]

_DEVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_MAX_INDEX = 999
_PRIVATE = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_COMMAND_TIMEOUT_S = 60.0
_KILL_WAIT_S = 5.0
_REPO_CONTAINERS_CONF = Path(__file__).resolve().parents[3] / "deploy" / "podman" / "containers.conf"


# --- names and addresses ---------------------------------------------------------------------
def _validate_device(device: str) -> str:
    if not isinstance(device, str) or not _DEVICE_NAME.fullmatch(device):
        raise ConfigError(f"device name {device!r} must match [a-z][a-z0-9-]{{0,31}}")
    return device


def bridge_name(lab: str) -> str:
    """The lab's bridge, ``fl<lab>br``."""
    return f"fl{validate_lab_name(lab)}br"


def veth_names(lab: str, index: int) -> tuple[str, str]:
    """The host and device ends of device ``index``'s veth: ``fl<lab><iii>h`` and ``fl<lab><iii>d``.

    The index has three digits so that no two labs' names can collide (lab ``a``'s device 12 and
    lab ``a1``'s device 2 would both be ``fla12h`` otherwise).
    """
    validate_lab_name(lab)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= _MAX_INDEX:
        raise ConfigError(f"device index {index!r} must be an integer from 0 to {_MAX_INDEX}")
    return f"fl{lab}{index:03d}h", f"fl{lab}{index:03d}d"


def netns_name(lab: str, device: str) -> str:
    """The network namespace of ``device``: ``fedge-<lab>-<device>``."""
    return f"fedge-{validate_lab_name(lab)}-{_validate_device(device)}"


def container_name(lab: str, device: str) -> str:
    """The container of ``device``'s agent: ``fedge-lab-<lab>-<device>``."""
    return f"fedge-lab-{validate_lab_name(lab)}-{_validate_device(device)}"


def _private_subnet(subnet: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"lab subnet {subnet!r} is not an IPv4 network like 10.213.0.0/24: {e}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ConfigError(f"lab subnet {subnet!r} must be IPv4")
    if not any(net.subnet_of(p) for p in _PRIVATE):
        raise ConfigError(f"lab subnet {subnet!r} must lie in 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16")
    return net


def subnet_addresses(subnet: str, count: int) -> tuple[str, list[str]]:
    """The bridge's address (``.1``) and ``count`` device addresses (``.2`` on), as CIDR strings.

    Raises:
        ConfigError: the subnet is not a private IPv4 network or has no room for ``count`` devices.
    """
    net = _private_subnet(subnet)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_INDEX + 1:
        raise ConfigError(f"device count {count!r} must be an integer from 1 to {_MAX_INDEX + 1}")
    room = net.num_addresses - 3  # network, broadcast and the bridge
    if count > room:
        raise ConfigError(f"lab subnet {subnet} has room for {max(room, 0)} devices, not {count}")
    first = net.network_address
    return (f"{first + 1}/{net.prefixlen}", [f"{first + 2 + i}/{net.prefixlen}" for i in range(count)])


def _lab_address(address_cidr: str) -> ipaddress.IPv4Interface:
    """A host address inside a private subnet with room for a bridge and at least one device."""
    try:
        iface = ipaddress.ip_interface(address_cidr)
    except (ValueError, TypeError):
        raise ConfigError(f"address {address_cidr!r} is not an address/prefix like 10.213.0.1/24") from None
    if not isinstance(iface, ipaddress.IPv4Interface) or "/" not in address_cidr:
        raise ConfigError(f"address {address_cidr!r} must be IPv4 with a prefix, like 10.213.0.1/24")
    net = _private_subnet(str(iface.network))
    if net.prefixlen > 30:
        raise ConfigError(f"lab subnet {net} has no room for a bridge and a device (prefix at most /30)")
    if iface.ip in (net.network_address, net.broadcast_address):
        raise ConfigError(f"address {address_cidr} is the network or broadcast address of {net}")
    return iface


# --- running commands ------------------------------------------------------------------------
@dataclass(frozen=True)
class Completed:
    """A finished command: what ran, its exit status and its output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs one command (``env``: variables added to the environment) and reports how it ended."""

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Completed: ...


def run_command(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Completed:
    """The real runner: ``subprocess.run`` with a timeout; a missing program is a :class:`LabError`."""
    args = list(argv)
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=_COMMAND_TIMEOUT_S,
                              env=None if env is None else {**os.environ, **env})
    except FileNotFoundError:
        raise LabError(f"{args[0]}: command not found (run `fedge lab check`)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{shlex.join(args)} did not finish within {_COMMAND_TIMEOUT_S:.0f} s") from None
    return Completed(tuple(args), done.returncode, done.stdout, done.stderr)


def _failed(done: Completed) -> LabError:
    said = " ".join(done.stderr.split()) or " ".join(done.stdout.split()) or "no output"
    return LabError(f"{shlex.join(done.argv)} failed (exit {done.returncode}): {said}")


def _must(run: Runner, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Completed:
    done = run(argv, env=env)
    if done.returncode != 0:
        raise _failed(done)
    return done


def _in_ns(netns: str | None, argv: Sequence[str]) -> list[str]:
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


def _ip(netns: str | None, *args: str) -> list[str]:
    return ["ip", *args] if netns is None else ["ip", "-n", netns, *args]


# --- what exists on the host -----------------------------------------------------------------
def _link_exists(run: Runner, dev: str, netns: str | None = None) -> bool:
    done = run(_ip(netns, "link", "show", "dev", dev))
    if done.returncode == 0:
        return True
    if "does not exist" in done.stderr or "Cannot open network namespace" in done.stderr:
        return False
    raise _failed(done)


def _netns_names(run: Runner) -> set[str]:
    done = _must(run, ["ip", "netns", "list"])
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def _mounted(run: Runner, path: str) -> bool:
    done = run(["findmnt", "-n", "-o", "TARGET", "--mountpoint", path])
    if done.returncode not in (0, 1):
        raise _failed(done)
    return done.returncode == 0


def _podman_env() -> dict[str, str]:
    # This machine's Podman needs the repository's settings (cgroupfs, runc); elsewhere, the host's.
    return {"CONTAINERS_CONF": str(_REPO_CONTAINERS_CONF)} if _REPO_CONTAINERS_CONF.exists() else {}


def _container_exists(run: Runner, name: str) -> bool:
    done = run(["podman", "container", "exists", name], env=_podman_env())
    if done.returncode not in (0, 1):
        raise _failed(done)
    return done.returncode == 0


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return None if rest[0] in ("Z", "X") else int(rest[19])  # a zombie has already died


def _loss_rule(lab: str, chain: str, probability: str) -> list[str]:
    return [chain, "-m", "statistic", "--mode", "random", "--probability", probability,
            "-m", "comment", "--comment", f"fedge-lab-{lab}", "-j", "DROP"]


def _disable_ipv6(run: Runner, dev: str, netns: str | None) -> None:
    # No IPv6 on lab links: router and neighbour solicitations would show up in the byte counters.
    if Path("/proc/sys/net/ipv6").exists():
        _must(run, _in_ns(netns, ["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"]))


@dataclass(frozen=True)
class Counters:
    """A link's kernel counters (``/sys/class/net/DEV/statistics``)."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


_COUNTERS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")


class Host:
    """Makes a lab's host resources, recording each in ``state`` before making it.

    Args:
        state: the lab's state file; its lab name must prefix every name given here.
        run: how commands run (a recording fake in unit tests).
    """

    def __init__(self, state: LabState, *, run: Runner = run_command) -> None:
        self.state = state
        self.run = run
        self._links = re.compile(rf"fl{state.lab}(br|\d{{3}}[hd])")

    # -- checks --
    def _absent_link(self, dev: str, netns: str | None = None) -> None:
        if not self._links.fullmatch(dev):
            lab = self.state.lab
            raise ConfigError(f"link name {dev!r} is not one of lab {lab!r}'s (fl{lab}br, fl{lab}<iii>h, "
                              f"fl{lab}<iii>d)")
        if _link_exists(self.run, dev, netns):
            raise LabError(f"link {dev} already exists; the lab will not take over a link it did not make")

    def _recorded_netns(self, netns: str) -> None:
        if not self.state.find("netns", name=netns):
            raise LabError(f"network namespace {netns!r} is not one this lab made")

    def _where(self, dev: str) -> str | None:
        """The namespace holding lab link ``dev`` (None: the host's); refuses links the lab did not make."""
        if self.state.find("bridge", name=dev) or self.state.find("veth", host_end=dev):
            return None
        for veth in self.state.find("veth", device_end=dev):
            return veth.text("netns")
        raise LabError(f"link {dev!r} is not one this lab made")

    # -- making --
    def bridge(self, name: str, address_cidr: str) -> Resource:
        """The lab's bridge with the coordinator's address; refuses a subnet the host already uses."""
        if name != bridge_name(self.state.lab):
            raise ConfigError(f"bridge name {name!r} must be {bridge_name(self.state.lab)!r}")
        net = _lab_address(address_cidr).network
        self._no_overlap(net)
        self._absent_link(name)
        resource = self.state.add("bridge", name=name, address=address_cidr)
        _must(self.run, ["ip", "link", "add", "name", name, "type", "bridge"])
        _disable_ipv6(self.run, name, None)
        _must(self.run, ["ip", "addr", "add", address_cidr, "dev", name])
        _must(self.run, ["ip", "link", "set", "dev", name, "up"])
        return resource

    def _no_overlap(self, net: ipaddress.IPv4Network) -> None:
        routes = _must(self.run, ["ip", "-4", "-o", "route", "show"]).stdout
        addrs = _must(self.run, ["ip", "-4", "-o", "addr", "show"]).stdout
        used = [line.split()[0] for line in routes.splitlines() if line.strip()]
        used += re.findall(r"\binet (\S+)", addrs)
        for cidr in used:
            if cidr == "default":
                continue
            with_prefix = ipaddress.ip_network(cidr, strict=False)
            if with_prefix.prefixlen > 0 and net.overlaps(with_prefix):
                raise LabError(f"lab subnet {net} overlaps {with_prefix}, already in use on this host; "
                               "choose another subnet")

    def netns(self, name: str) -> Resource:
        """A device's network namespace, ``fedge-<lab>-<device>``."""
        prefix = f"fedge-{self.state.lab}-"
        if not name.startswith(prefix):
            raise ConfigError(f"network namespace {name!r} must be named {prefix}<device>")
        _validate_device(name[len(prefix):])
        if name in _netns_names(self.run):
            raise LabError(f"network namespace {name} already exists; the lab will not take it over")
        resource = self.state.add("netns", name=name)
        _must(self.run, ["ip", "netns", "add", name])
        return resource

    def veth(self, host_end: str, device_end: str, *, netns: str, bridge: str, address_cidr: str) -> Resource:
        """A veth pair: ``host_end`` on ``bridge``, ``device_end`` in ``netns`` with ``address_cidr``."""
        if not (host_end.endswith("h") and device_end == host_end[:-1] + "d"):
            raise ConfigError(f"veth ends {host_end!r}, {device_end!r} must be a pair "
                              "fl<lab><iii>h, fl<lab><iii>d")
        bridges = self.state.find("bridge", name=bridge)
        if not bridges:
            raise LabError(f"bridge {bridge!r} is not one this lab made")
        self._recorded_netns(netns)
        iface, gateway = _lab_address(address_cidr), _lab_address(bridges[0].text("address"))
        if iface.network != gateway.network or iface.ip == gateway.ip:
            raise ConfigError(f"device address {address_cidr} must be another address of {gateway.network}")
        for other in self.state.find("veth"):
            if _lab_address(other.text("address")).ip == iface.ip:
                raise ConfigError(f"device address {address_cidr} is already {other.text('device_end')}'s")
        self._absent_link(host_end)
        self._absent_link(device_end)
        resource = self.state.add("veth", host_end=host_end, device_end=device_end, netns=netns,
                                  address=address_cidr)
        _must(self.run, ["ip", "link", "add", "name", host_end, "type", "veth",
                         "peer", "name", device_end, "netns", netns])
        _disable_ipv6(self.run, host_end, None)
        _disable_ipv6(self.run, device_end, netns)
        _must(self.run, ["ip", "link", "set", "dev", host_end, "master", bridge])
        # No flooding of unknown unicast or multicast to this port: while another device's link is
        # down the bridge forgets its address, and the coordinator's resends to it would otherwise
        # go out of every other port, into their byte counters. (Broadcast, hence ARP, still floods.)
        _must(self.run, ["ip", "link", "set", "dev", host_end, "type", "bridge_slave", "flood", "off",
                         "mcast_flood", "off"])
        _must(self.run, _ip(netns, "addr", "add", address_cidr, "dev", device_end))
        _must(self.run, ["ip", "link", "set", "dev", host_end, "up"])
        _must(self.run, _ip(netns, "link", "set", "dev", device_end, "up"))
        _must(self.run, _ip(netns, "link", "set", "dev", "lo", "up"))
        return resource

    def shape(self, dev: str, rate_bps: int | None, *, netns: str | None = None) -> Resource | None:
        """Limit what ``dev`` sends to ``rate_bps`` bits/s with tbf; ``None`` removes the limit.

        The burst is 32 kbit (4096 bytes), or 10 ms at the rate if that is more: tbf cannot pass more
        than a burst per kernel tick, so a fixed small burst would cap fast links below their rate.
        """
        if self._where(dev) != netns:
            raise LabError(f"link {dev!r} is not in namespace {netns or 'of the host'}")
        recorded = self.state.find("qdisc", dev=dev, netns=netns)
        if rate_bps is None:
            for resource in recorded:
                self.remove(resource)
            return None
        if isinstance(rate_bps, bool) or not isinstance(rate_bps, int) or not 0 < rate_bps <= 10**11:
            raise ConfigError(f"link rate {rate_bps!r} must be an integer number of bits/s in 1..1e11")
        resource = recorded[0] if recorded else self.state.add("qdisc", dev=dev, netns=netns)
        burst = max(4096, rate_bps // 800)
        _must(self.run, _in_ns(netns, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                                       f"{rate_bps}bit", "burst", f"{burst}b", "latency", "400ms"]))
        return resource

    def loss(self, netns: str, probability: float) -> list[Resource]:
        """Drop each packet in and out of ``netns`` with ``probability`` (iptables); 0 removes the rules."""
        self._recorded_netns(netns)
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) \
                or not 0.0 <= probability < 1.0:
            raise ConfigError(f"loss probability {probability!r} must be a number in [0, 1)")
        for resource in self.state.find("iptables", netns=netns):
            self.remove(resource)
        if probability == 0:
            return []
        made = []
        for chain in ("INPUT", "OUTPUT"):
            text = format(float(probability), ".10g")
            made.append(self.state.add("iptables", netns=netns, chain=chain, probability=text))
            _must(self.run, _in_ns(netns, ["iptables", "-w", "-A", *_loss_rule(self.state.lab, chain, text)]))
        return made

    def dropped(self, netns: str) -> dict[str, tuple[int, int]]:
        """What the loss rules of ``netns`` dropped: chain -> (packets, bytes of IP packets).

        ``INPUT`` drops are packets the host end sent (and counted) that the device never got;
        ``OUTPUT`` drops never reached the link. Empty when the namespace has no loss rules.
        """
        self._recorded_netns(netns)
        out: dict[str, tuple[int, int]] = {}
        for chain in ("INPUT", "OUTPUT"):
            if not self.state.find("iptables", netns=netns, chain=chain):
                continue
            listing = _must(self.run, _in_ns(netns, ["iptables", "-w", "-L", chain, "-v", "-x", "-n"])).stdout
            packets = size = 0
            for line in listing.splitlines():
                fields = line.split()
                if "DROP" in fields and f"fedge-lab-{self.state.lab}" in line and fields[0].isdigit():
                    packets, size = packets + int(fields[0]), size + int(fields[1])
            out[chain] = (packets, size)
        return out

    def link(self, dev: str, up: bool) -> None:
        """Set a lab link up or down (an outage)."""
        _must(self.run, _ip(self._where(dev), "link", "set", "dev", dev, "up" if up else "down"))

    def counters(self, dev: str) -> Counters:
        """The kernel's byte and packet counters of lab link ``dev``."""
        netns = self._where(dev)
        files = [f"/sys/class/net/{dev}/statistics/{name}" for name in _COUNTERS]
        try:
            if netns is None:
                values = [Path(f).read_text() for f in files]
            else:  # `ip netns exec` mounts the namespace's own /sys
                values = _must(self.run, _in_ns(netns, ["cat", *files])).stdout.split()
            return Counters(*(int(v) for v in values))
        except (OSError, ValueError, TypeError) as e:
            raise LabError(f"cannot read the counters of {dev}: {e}") from None

    def tmpfs(self, path: Path, size_bytes: int) -> Resource:
        """A tmpfs of ``size_bytes`` at ``path`` (mode 0755), inside the folder of the state file."""
        path = Path(path)
        if not path.is_absolute() or ".." in path.parts or not path.is_relative_to(self.state.path.parent):
            raise ConfigError(f"tmpfs path {str(path)!r} must be an absolute path under "
                              f"{self.state.path.parent}")
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 4096:
            raise ConfigError(f"tmpfs size {size_bytes!r} must be an integer of at least 4096 bytes")
        if _mounted(self.run, str(path)):
            raise LabError(f"{path} is already a mount point; the lab will not take it over")
        resource = self.state.add("mount", path=str(path))
        path.mkdir(parents=True, exist_ok=True)
        _must(self.run, ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)])
        return resource

    # -- recording what others start --
    def record_container(self, name: str) -> Resource:
        """Record container ``name`` (``fedge-lab-<lab>-<device>``) before the caller starts it."""
        prefix = f"fedge-lab-{self.state.lab}-"
        if not name.startswith(prefix):
            raise ConfigError(f"container name {name!r} must be {prefix}<device>")
        _validate_device(name[len(prefix):])
        return self.state.add("container", name=name)

    def record_process(self, pid: int) -> Resource:
        """Record a running process by pid and start time, so a recycled pid is never killed."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
            raise ConfigError(f"pid {pid!r} must be an integer greater than 1")
        start = _start_time(pid)
        if start is None:
            raise LabError(f"process {pid} is not running")
        return self.state.add("process", pid=pid, start_time=start)

    def record_file(self, path: Path) -> Resource:
        """Record a file (or empty folder) that teardown deletes."""
        if not Path(path).is_absolute():
            raise ConfigError(f"file path {str(path)!r} must be absolute")
        return self.state.add("file", path=str(path))

    def remove(self, resource: Resource) -> bool:
        """Remove one resource now and drop it from the state file; False if it was already gone."""
        removed = _remove(self.run, self.state.lab, resource)
        self.state.discard(resource)
        return removed


# --- removing --------------------------------------------------------------------------------
def _remove(run: Runner, lab: str, r: Resource) -> bool:
    """Remove one resource; True if it was there, False if already gone; LabError if it stays."""
    if r.kind == "container":
        if not _container_exists(run, r.text("name")):
            return False
        _must(run, ["podman", "rm", "-f", "-t", "0", r.text("name")], env=_podman_env())
    elif r.kind == "process":
        return _kill(r.integer("pid"), r.integer("start_time"))
    elif r.kind in ("iptables", "qdisc"):
        netns = r.optional_text("netns")
        if netns is not None and netns not in _netns_names(run):
            return False  # the namespace took its rules and links with it
        if r.kind == "iptables":
            rule = _loss_rule(lab, r.text("chain"), r.text("probability"))
            check = run(_in_ns(netns, ["iptables", "-w", "-C", *rule]))
            if check.returncode == 1:
                return False
            if check.returncode != 0:
                raise _failed(check)
            _must(run, _in_ns(netns, ["iptables", "-w", "-D", *rule]))
        else:
            dev = r.text("dev")
            if not _link_exists(run, dev, netns):
                return False
            shown = _must(run, _in_ns(netns, ["tc", "qdisc", "show", "dev", dev, "root"])).stdout
            if not re.search(r"^qdisc tbf ", shown, re.MULTILINE):
                return False
            _must(run, _in_ns(netns, ["tc", "qdisc", "del", "dev", dev, "root"]))
    elif r.kind in ("veth", "bridge"):
        dev = r.text("host_end" if r.kind == "veth" else "name")
        if not _link_exists(run, dev):
            return False  # a veth also goes when its namespace is deleted
        _must(run, ["ip", "link", "del", "dev", dev])
    elif r.kind == "netns":
        if r.text("name") not in _netns_names(run):
            return False
        _must(run, ["ip", "netns", "del", r.text("name")])
    elif r.kind == "mount":
        path = r.text("path")
        if not _mounted(run, path):
            return False
        _must(run, ["umount", "-l", path])
        with contextlib.suppress(OSError):  # not empty, or gone: only the mount itself is the lab's
            Path(path).rmdir()
    else:  # file
        file = Path(r.text("path"))
        if not file.exists() and not file.is_symlink():
            return False
        try:
            file.rmdir() if file.is_dir() and not file.is_symlink() else file.unlink()
        except OSError as e:
            raise LabError(f"cannot delete {file}: {e.strerror}") from None
    return True


def _kill(pid: int, start_time: int) -> bool:
    if _start_time(pid) != start_time:
        return False  # gone, or the pid now belongs to another process: never kill that one
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + _KILL_WAIT_S
    while _start_time(pid) == start_time:
        if time.monotonic() > deadline:
            raise LabError(f"process {pid} is still running {_KILL_WAIT_S:.0f} s after SIGKILL")
        time.sleep(0.02)
    return True


@dataclass(frozen=True)
class TeardownReport:
    """What :func:`teardown` did: each list holds :meth:`Resource.describe` strings."""

    removed: tuple[str, ...]
    already_gone: tuple[str, ...]
    failures: tuple[str, ...]
    state_deleted: bool

    @property
    def ok(self) -> bool:
        return not self.failures


def teardown(state: LabState, *, run: Runner = run_command) -> TeardownReport:
    """Remove every resource ``state`` records, newest first, and then the state file.

    What is already gone is skipped; a resource that cannot be removed stays recorded (so a later
    ``fedge lab down`` retries it) and teardown goes on with the rest. The state file is deleted
    only when nothing it recorded is left.
    """
    removed: list[str] = []
    gone: list[str] = []
    failures: list[str] = []
    for resource in reversed(state.resources()):
        try:
            (removed if _remove(run, state.lab, resource) else gone).append(resource.describe())
        except (LabError, OSError) as e:
            failures.append(f"{resource.describe()}: {e}")
            continue
        state.discard(resource)
    if not state.resources():
        state.delete()
    return TeardownReport(tuple(removed), tuple(gone), tuple(failures), not state.resources())


def leftovers(lab: str, *, root: Path = LAB_ROOT, run: Runner = run_command) -> list[str]:
    """What of lab ``lab`` still exists on the host, found by name and not from its state file.

    Looks for network namespaces ``fedge-<lab>-*``, links ``fl<lab>br`` and ``fl<lab><iii>[hd]``,
    mounts under :func:`lab_dir`, containers ``fedge-lab-<lab>-*`` and iptables rules of the host
    tagged ``fedge-lab-<lab>``. A tool that is not installed cannot have made anything; one that
    fails is reported, since then nothing can be proven absent.
    """
    validate_lab_name(lab)
    found = [f"netns {n}" for n in sorted(_netns_names(run)) if n.startswith(f"fedge-{lab}-")]
    links = re.compile(rf"fl{lab}(br|\d{{3}}[hd])")
    found += [f"link {n}" for n in sorted(os.listdir("/sys/class/net")) if links.fullmatch(n)]
    folder = str(lab_dir(lab, root=root))
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # spaces come as \040
        if point == folder or point.startswith(folder + "/"):
            found.append(f"mount {point}")
    for argv, tag in ((["podman", "ps", "-a", "--format", "{{.Names}}"], "container"),
                      (["iptables", "-w", "-S"], "iptables")):
        try:
            done = run(argv, env=_podman_env() if tag == "container" else None)
        except LabError as e:
            if "command not found" in str(e):
                continue
            raise
        if done.returncode != 0:
            found.append(f"{tag}: {_failed(done)}")
            continue
        for line in done.stdout.splitlines():
            if tag == "container" and line.strip().startswith(f"fedge-lab-{lab}-"):
                found.append(f"container {line.strip()}")
            elif tag == "iptables" and re.search(rf"fedge-lab-{lab}(?![a-z0-9-])", line):
                found.append(f"iptables {line.strip()}")
    return found

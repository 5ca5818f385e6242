"""The lab's host resources for real (root): a bridge, two namespaces on shaped, lossy veths, tmpfs
state dirs; traffic from a namespace to the bridge address; teardown, also after a ``kill -9``,
leaving nothing that :func:`leftovers` can find."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.lab.host import (
    Host,
    LabState,
    bridge_name,
    leftovers,
    netns_name,
    state_path,
    subnet_addresses,
    teardown,
    veth_names,
)

pytestmark = pytest.mark.lab

_PID = os.getpid()


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the lab's host resources need root (network namespaces, tc, iptables, mounts)")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A lab name of this test process, its state root; whatever the test leaves is torn down."""
    _need_root()
    name = f"h{_PID % 100000}"
    yield name, tmp_path
    path = state_path(name, root=tmp_path)
    if path.exists():
        teardown(LabState.load(path))


def _serve(address: str, port: int, received: list[int]) -> socket.socket:
    """A TCP server on the host that counts what it receives and answers 100 kB per connection."""
    server = socket.create_server((address, port))
    server.settimeout(30)

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                n = 0
                while chunk := conn.recv(65536):
                    n += len(chunk)
                    if n >= 200_000:
                        break
                received.append(n)
                conn.sendall(b"y" * 100_000)

    threading.Thread(target=loop, daemon=True).start()
    return server


def _client(netns: str, address: str, port: int, *, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """From inside ``netns``: send 200 kB to the host, read 100 kB back, print how long it took."""
    code = textwrap.dedent(f"""
        import socket, time
        t = time.monotonic()
        s = socket.create_connection(({address!r}, {port}), timeout={timeout_s})
        s.sendall(b"x" * 200_000)
        got = 0
        while got < 100_000:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        print(got, time.monotonic() - t)
    """)
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=timeout_s + 30, check=False)


def test_a_lab_network_carries_shaped_lossy_traffic_and_tears_down_to_nothing(lab: tuple[str, Path]) -> None:
    name, root = lab
    subnet = f"10.231.{_PID % 250}.0/24"
    gateway, addresses = subnet_addresses(subnet, 2)
    state = LabState.create(state_path(name, root=root), lab=name)
    host = Host(state)
    bridge = bridge_name(name)
    host.bridge(bridge, gateway)
    devices = []
    for i, device in enumerate(["pi-0", "pc-0"]):
        ns = netns_name(name, device)
        host_end, device_end = veth_names(name, i)
        host.netns(ns)
        host.veth(host_end, device_end, netns=ns, bridge=bridge, address_cidr=addresses[i])
        host.tmpfs(root / name / "disk" / device, 1 << 20)
        devices.append((ns, host_end, device_end))
    ns0, host0, dev0 = devices[0]
    host.shape(host0, 2_000_000)
    host.shape(dev0, 2_000_000, netns=ns0)
    host.loss(ns0, 0.02)
    # Both loss rules are in the device's namespace, none in the host's.
    rules = subprocess.run(["ip", "netns", "exec", ns0, "iptables", "-S"], capture_output=True, text=True,
                           check=True).stdout
    assert rules.count("--probability 0.020") == 2 and "-j DROP" in rules, rules
    assert f"fedge-lab-{name}" not in subprocess.run(["iptables", "-S"], capture_output=True, text=True,
                                                     check=True).stdout
    shown = subprocess.run(["tc", "qdisc", "show", "dev", host0], capture_output=True, text=True, check=True)
    assert "tbf" in shown.stdout and "rate 2Mbit" in shown.stdout, shown.stdout
    assert not Path(f"/proc/sys/net/ipv6/conf/{host0}").exists() or \
        Path(f"/proc/sys/net/ipv6/conf/{host0}/disable_ipv6").read_text().strip() == "1"

    # The disk is a tmpfs of the size asked for: writing past it fails.
    disk = root / name / "disk" / "pi-0"
    with pytest.raises(OSError), (disk / "fill").open("wb") as f:
        f.write(b"\0" * (2 << 20))
        f.flush()
        os.fsync(f.fileno())

    port = 20000 + _PID % 20000
    received: list[int] = []
    server = _serve(gateway.split("/")[0], port, received)
    try:
        before = host.counters(host0)
        slow = _client(ns0, gateway.split("/")[0], port, timeout_s=30)
        assert slow.returncode == 0, slow.stderr
        got, took_s = slow.stdout.split()
        assert int(got) == 100_000
        # 200 kB up at 2 Mbit/s takes about 0.8 s; unshaped it takes milliseconds.
        assert float(took_s) > 0.5, took_s
        after = host.counters(host0)
        assert after.rx_bytes - before.rx_bytes >= 200_000  # what the device sent, as the host end saw it
        assert after.tx_bytes - before.tx_bytes >= 100_000
        assert after.rx_packets > before.rx_packets and after.tx_packets > before.tx_packets
        fast = _client(devices[1][0], gateway.split("/")[0], port, timeout_s=30)
        assert fast.returncode == 0, fast.stderr
        assert float(fast.stdout.split()[1]) < float(took_s)

        host.link(host0, False)  # an outage: nothing gets through
        down = _client(ns0, gateway.split("/")[0], port, timeout_s=2)
        assert down.returncode != 0
        host.link(host0, True)
        assert _client(ns0, gateway.split("/")[0], port, timeout_s=30).returncode == 0
    finally:
        server.close()

    host.shape(host0, None)
    assert "tbf" not in subprocess.run(["tc", "qdisc", "show", "dev", host0], capture_output=True,
                                       text=True, check=True).stdout
    host.loss(ns0, 0)
    assert "DROP" not in subprocess.run(["ip", "netns", "exec", ns0, "iptables", "-S"], capture_output=True,
                                        text=True, check=True).stdout

    assert leftovers(name, root=root)  # the lab is up: it is found
    report = teardown(state)
    assert report.ok, report.failures
    assert report.state_deleted and not state.path.exists()
    assert leftovers(name, root=root) == []


_CRASHING_SETUP = """
import os, signal, subprocess, sys
from pathlib import Path
from fedge.lab.host import *
name, root, subnet = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
gateway, addresses = subnet_addresses(subnet, 3)
host = Host(LabState.create(state_path(name, root=root), lab=name))
host.bridge(bridge_name(name), gateway)
for i in range(2):
    ns = netns_name(name, f"d-{i}")
    host.netns(ns)
    h, d = veth_names(name, i)
    host.veth(h, d, netns=ns, bridge=bridge_name(name), address_cidr=addresses[i])
    host.shape(d, 1_000_000, netns=ns)
    host.loss(ns, 0.05)
    host.tmpfs(root / name / "disk" / f"d-{i}", 1 << 20)
# The third device is half made: its namespace exists, its veth is only recorded.
ns = netns_name(name, "d-2")
host.netns(ns)
h, d = veth_names(name, 2)
host.state.add("veth", host_end=h, device_end=d, netns=ns, address=addresses[2])
sleeper = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
host.record_process(sleeper.pid)
print(sleeper.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_teardown_after_a_kill_9_mid_setup_removes_everything(lab: tuple[str, Path]) -> None:
    name, root = lab
    subnet = f"10.232.{_PID % 250}.0/24"
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_SETUP, name, str(root), subnet],
                             capture_output=True, text=True, timeout=120, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    sleeper = int(crashed.stdout.split()[0])
    left = leftovers(name, root=root)
    assert f"netns {netns_name(name, 'd-2')}" in left and f"link {bridge_name(name)}" in left
    assert sum(item.startswith("mount ") for item in left) == 2

    state = LabState.load(state_path(name, root=root))
    assert [r.kind for r in state.resources()].count("veth") == 3
    report = teardown(state)
    assert report.ok, report.failures
    assert any(item.startswith("veth") for item in report.already_gone)  # the one only recorded
    assert f"process {sleeper}" in report.removed
    assert leftovers(name, root=root) == []
    assert not state_path(name, root=root).exists()
    time.sleep(0.1)
    assert not Path(f"/proc/{sleeper}").exists() or \
        Path(f"/proc/{sleeper}/stat").read_text().split(") ")[1][0] == "Z"

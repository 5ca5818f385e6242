"""``fedge lab run``: bring a lab fleet up, run its federation and fault schedule, report, tear down.

The order of a run, each step recorded in the lab's state file before it
touches the host (:mod:`fedge.lab.host`), so that ``fedge lab down`` or the
``finally`` below can always undo it:

1. prerequisites (:mod:`fedge.lab.prereqs`) and the agent images for every
   architecture in the spec (:mod:`fedge.lab.images`, cached);
2. each device's data file (the simulator's own partition of the data set),
   a CA, the coordinator's server certificate for the lab bridge's address
   and one single-use enrolment token per device;
3. the bridge, then per device a network namespace, a veth pair with IPv6
   off, ``tbf`` shaping both ways and random-drop rules, and a tmpfs disk;
4. the coordinator (the host's ``fedge coordinator``) on the bridge address,
   then one Podman container per device running the image's ``fedge agent``,
   which enrols with its token and trains over mutual TLS;
5. the fault schedule, fired by round or by time while ``/v1/status`` is
   polled; an agent container that dies is started again, as a service
   manager would, unless a fault killed it with ``restart = false``;
6. once the coordinator reports ``done``: the kernel's counters of every
   host veth end, the agents' own counts, the store's rounds, a plain
   simulation of the same partitions for comparison, then teardown and the
   report, which says whether teardown left anything behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge import pki
from fedge.coordinator.identity import create_token, init_ca, issue_server, tls_files
from fedge.demo import process_cpu_s
from fedge.errors import FedgeError
from fedge.lab.control import forget, state_path, write_run_info
from fedge.lab.data import agent_toml, coordinator_toml, simulate_args, write_device_data
from fedge.lab.faults import FILL_FILE, Fault, due, fill_disk, memory_hog, poll_interval
from fedge.lab.host import (
    Host,
    LabError,
    LabState,
    bridge_name,
    container_name,
    lab_dir,
    leftovers,
    netns_name,
    subnet_addresses,
    teardown,
    veth_names,
)
from fedge.lab.images import ensure_agent_image, podman_env
from fedge.lab.prereqs import host_arch, require
from fedge.lab.report import write_report
from fedge.lab.results import Collected, final_wire_counts, kernel_view, ratio, recovery, rounds_and_devices
from fedge.lab.spec import DeviceSpec, LabSpec
from fedge.store import Store

__all__ = ["LabRun", "run_lab"]

logger = logging.getLogger(__name__)

_PORT = 8443
_UID = 10001  # the image's fedge user
_AGENT_EXIT_S = 60.0
_START_PARALLEL = 4
_SAMPLE_S = 1.0
_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")  # one connection: address and port
_RETRANS = re.compile(r"\bbytes_retrans:(\d+)")
_WATCH_S = 10.0  # how often the lab looks for agent containers that exited
_STARTUP_S = 120.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Device:
    spec: DeviceSpec
    netns: str
    host_end: str
    device_end: str
    address: str
    container: str
    disk: Path
    files: Path
    restarts: int = 0
    # Set while a fault keeps it down on purpose (kill-agent with restart = false, or before its restart).
    held_down: bool = False


class LabRun:
    """One lab run: its spec, its host resources, its processes and what they did."""

    def __init__(self, spec: LabSpec, *, out_dir: Path, progress: Callable[[str], None]) -> None:
        self.spec = spec
        self.out = out_dir.resolve()
        self._progress = progress
        self.name = spec.lab.name
        specs = spec.devices()
        bridge_cidr, device_cidrs = subnet_addresses(spec.lab.subnet, len(specs))
        self.bridge_ip, prefix = bridge_cidr.split("/")
        self.prefix = int(prefix)
        self.bridge = bridge_name(self.name)
        self.devices = []
        for d, cidr in zip(specs, device_cidrs, strict=True):
            host_end, device_end = veth_names(self.name, d.index)
            self.devices.append(_Device(
                spec=d, netns=netns_name(self.name, d.name), host_end=host_end, device_end=device_end,
                address=cidr.split("/")[0], container=container_name(self.name, d.name),
                disk=lab_dir(self.name) / "disk" / d.name, files=self.out / "devices" / d.name,
            ))
        self.by_name = {d.spec.name: d for d in self.devices}
        self.store_dir = self.out / "coordinator"
        self.url = f"https://{self.bridge_ip}:{_PORT}"
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.coordinator_restarts = 0
        self.coordinator_cpu_s = 0.0
        self.faults = [Fault(f) for f in spec.faults]
        self.images: dict[str, str] = {}
        self.admin_token = ""
        self.started_unix = time.time()
        self.agents_started: float | None = None
        self.training_cpu: tuple[float, float] | None = None  # the lab's own CPU and wall over the rounds
        self.last_status: dict[str, Any] | None = None
        # Seconds from the start of the run to each milestone (images ready, network up, all enrolled...).
        self.timeline: dict[str, float] = {}
        self.reaped_cpu_s = 0.0  # CPU of coordinators killed and reaped by this process
        self.runner_cpu_s = self.conmon_cpu_s = 0.0  # the lab's own CPU over the rounds, by part
        self._logs: list[Any] = []
        self.poll_s: list[float] = []  # how long each /v1/status poll took
        # The coordinator's TCP connections: (local, peer) -> bytes it sent again (TCP_INFO, via ss).
        self.retransmitted: dict[tuple[str, str], int] = {}
        self._execs: list[subprocess.Popen[bytes]] = []  # fill-memory processes inside containers
        # Last: once the state file exists a lab of this name is up until teardown forgets it.
        self.state = LabState.create(state_path(self.name), lab=self.name)
        self.host = Host(self.state)

    def mark(self, milestone: str) -> None:
        self.timeline.setdefault(milestone, round(time.time() - self.started_unix, 3))

    def say(self, line: str) -> None:
        """Show a progress line, and keep it where `fedge lab status` reads it."""
        self._progress(line)
        write_run_info(self.name, out_dir=self.out, spec=self.spec.path, line=line)

    # --- set-up -----------------------------------------------------------------------------
    def prepare(self) -> None:
        for arch in sorted(self.spec.arches):
            self.images[arch] = ensure_agent_image(arch, progress=self.say)
        self.mark("images_ready")
        for folder in (self.out / "logs", self.store_dir):
            folder.mkdir(parents=True, exist_ok=True)
        data = write_device_data(self.spec, self.out / "data")
        _, self.admin_token = init_ca(self.store_dir)
        issue_server(self.store_dir, hosts=["localhost"], ips=[self.bridge_ip])
        ca = tls_files(self.store_dir).ca_cert
        with Store(self.store_dir) as store:
            for d in self.devices:
                d.files.mkdir(parents=True, exist_ok=True)
                (d.files / "data.npz").write_bytes(data.devices[d.spec.name].read_bytes())
                (d.files / "ca.crt").write_bytes(ca.read_bytes())
                reply = create_token(store, expires_s=24 * 3600.0, uses=1, device_id=d.spec.name,
                                     now=time.time())
                (d.files / "token").write_text(reply.token + "\n")
                (d.files / "agent.toml").write_text(agent_toml(d.spec))
                for path in d.files.iterdir():
                    os.chown(path, _UID, _UID)
                    path.chmod(0o600 if path.name == "token" else 0o644)
                os.chown(d.files, _UID, _UID)
        (self.out / "coordinator.toml").write_text(
            coordinator_toml(self.spec, data_dir=self.store_dir, eval_data=data.test))

    def network(self) -> None:
        self.say(f"network: bridge {self.bridge} {self.bridge_ip}/{self.prefix}, "
                 f"{len(self.devices)} namespaces")
        self.host.bridge(self.bridge, f"{self.bridge_ip}/{self.prefix}")
        for d in self.devices:
            self.host.netns(d.netns)
            self.host.veth(d.host_end, d.device_end, netns=d.netns, bridge=self.bridge,
                           address_cidr=f"{d.address}/{self.prefix}")
            self._shape(d, d.spec.link.rate_bps)
            if d.spec.link.loss > 0:
                self.host.loss(d.netns, d.spec.link.loss)
            self.host.tmpfs(d.disk, d.spec.disk_bytes)
            os.chown(d.disk, _UID, _UID)
            d.disk.chmod(0o700)
        self.mark("network_up")

    def _shape(self, d: _Device, rate_bps: int | None) -> None:
        self.host.shape(d.host_end, rate_bps)  # downlink: what the device receives
        self.host.shape(d.device_end, rate_bps, netns=d.netns)  # uplink: what it sends

    # --- processes --------------------------------------------------------------------------
    def start_coordinator(self) -> None:
        log = (self.out / "logs" / "coordinator.log").open("ab")
        self._logs.append(log)
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "--log-format", "json", "coordinator", "--config",
             str(self.out / "coordinator.toml"), "--exit-when-done"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads run yet
        )
        self.host.record_process(self.coordinator.pid)
        deadline = time.monotonic() + _STARTUP_S
        while not self._healthy():
            if self.coordinator.poll() is not None:
                raise LabError(f"the coordinator exited with status {self.coordinator.returncode}:\n"
                               f"{_tail(self.out / 'logs' / 'coordinator.log')}")
            if time.monotonic() > deadline:
                raise LabError(f"the coordinator did not answer on {self.url} within {_STARTUP_S:.0f} s")
            time.sleep(0.2)

    def _client(self) -> Any:
        import httpx

        context = pki.client_ssl_context(ca_file=tls_files(self.store_dir).ca_cert)
        return httpx.Client(verify=context, headers={"authorization": f"Bearer {self.admin_token}"},
                            timeout=5.0)

    def _healthy(self) -> bool:
        import httpx

        with self._client() as client:
            try:
                return bool(client.get(f"{self.url}/healthz").status_code == 200)
            except httpx.HTTPError:
                return False

    def status(self) -> dict[str, Any] | None:
        import httpx

        t0 = time.perf_counter()
        try:
            r = self._http.get(f"{self.url}/v1/status")
        except httpx.HTTPError:
            return None
        finally:
            self.poll_s.append(time.perf_counter() - t0)
        return r.json() if r.status_code == 200 else None

    def start_agents(self) -> None:
        """Start every device's container: emulated ones first (they take longest to come up), a few
        at a time (Podman serializes little, and a fleet starts in a fraction of the time)."""
        for d in self.devices:  # recorded one by one: the state file is written from this thread
            self.host.record_container(d.container)
        native = host_arch()
        order = sorted(self.devices, key=lambda d: d.spec.arch == native)
        pool = ThreadPoolExecutor(max_workers=_START_PARALLEL)
        try:
            for done in [pool.submit(self._run_container, d) for d in order]:
                done.result()
        finally:  # on an error or Ctrl-C, start no more: teardown should not wait for them
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_container(self, d: _Device) -> None:
        spec = d.spec
        _podman("rm", "-f", "--ignore", d.container)
        _podman(
            # The image's HEALTHCHECK would need systemd timers on the host; the lab watches agents itself.
            "run", "-d", "--name", d.container, "--label", f"fedge-lab={self.name}", "--arch", spec.arch,
            "--no-healthcheck",
            "--network", f"ns:/run/netns/{d.netns}", "--cpus", f"{spec.cpus:g}",
            "--memory", str(spec.memory_bytes), "--memory-swap", str(spec.memory_bytes),
            "-v", f"{d.disk}:/var/lib/fedge", "-v", f"{d.files}:/etc/fedge:ro",
            "--env", "OMP_NUM_THREADS=1", "--env", "OPENBLAS_NUM_THREADS=1",
            self.images[spec.arch],
            "--config", "/etc/fedge/agent.toml", "--coordinator", self.url, "--device-id", spec.name,
            "--data", "/etc/fedge/data.npz", "--state-dir", "/var/lib/fedge",
            "--ca-cert", "/etc/fedge/ca.crt", "--token-file", "/etc/fedge/token",
        )

    def running_agents(self) -> set[str] | None:
        """The lab's containers that run now (one ``podman ps`` for the whole fleet, cheap to poll);
        None when Podman could not say."""
        done = subprocess.run(["podman", "ps", "--filter", f"label=fedge-lab={self.name}", "--format",
                               "{{.Names}}"], capture_output=True, text=True, env=podman_env(), check=False,
                              timeout=60)
        return set(done.stdout.split()) if done.returncode == 0 else None

    def restart_dead_agents(self) -> None:
        running = self.running_agents()
        if running is None:
            return
        for d in self.devices:
            if not d.held_down and d.container not in running:
                logger.warning("agent %s is not running; starting it again", d.spec.name)
                self.say(f"agent {d.spec.name} exited; starting it again")
                try:
                    _podman("start", d.container)
                except LabError as e:
                    logger.warning("could not start agent %s again: %s", d.spec.name, e)
                    continue
                d.restarts += 1

    # --- the run ----------------------------------------------------------------------------
    def train(self) -> None:
        self._http = self._client()
        self.start_agents()
        self.agents_started = time.time()
        self.mark("agents_started")
        # The overhead window opens with the first round (start-up, images and enrolment are not
        # "during rounds"); until then these are the agents' start.
        conmon0 = self._conmon_cpu()
        cpu0, wall0, reaped0 = _own_cpu_s(), time.monotonic(), self.reaped_cpu_s
        window_open = False
        deadline = time.monotonic() + self.spec.lab.timeout_s
        shown = ""
        last_check = last_sample = 0.0
        while True:
            status = self.status()
            if status is not None:
                self.last_status = status
                if status["devices"] >= len(self.devices):
                    self.mark("all_enrolled")
                if status.get("open"):
                    self.mark("first_round_open")
                    if not window_open:
                        window_open = True
                        conmon0 = self._conmon_cpu()
                        cpu0, wall0, reaped0 = _own_cpu_s(), time.monotonic(), self.reaped_cpu_s
                if status["rounds_complete"] >= 1:
                    self.mark("first_round_complete")
                line = _progress_line(status, len(self.devices))
                if line != shown:
                    self.say(line)
                    shown = line
                if status["state"] == "done":
                    break
            self.fire_faults(status)
            self.undo_faults()
            if time.monotonic() - last_sample > _SAMPLE_S:
                self.sample_retransmissions()
                last_sample = time.monotonic()
            if time.monotonic() - last_check > _WATCH_S:
                self.restart_dead_agents()
                last_check = time.monotonic()
            coordinator = self.coordinator
            if coordinator is not None and coordinator.poll() is not None and not self._coordinator_down:
                raise LabError(f"the coordinator exited with status {coordinator.returncode}:\n"
                               f"{_tail(self.out / 'logs' / 'coordinator.log')}")
            if time.monotonic() > deadline:
                raise LabError(f"the federation did not finish within timeout_s = "
                               f"{self.spec.lab.timeout_s:g} s")
            time.sleep(poll_interval(self.faults, self.last_status))
        # The lab's own CPU over the rounds: this process, the commands it ran (ip, tc, ss, podman)
        # and Podman's conmon monitors; coordinators it reaped are taken out (they are not overhead).
        self.runner_cpu_s = _own_cpu_s() - cpu0 - (self.reaped_cpu_s - reaped0)
        conmon1 = {pid: cpu for pid in conmon0 if (cpu := process_cpu_s(pid)) is not None}
        self.conmon_cpu_s = sum(cpu - conmon0[pid] for pid, cpu in conmon1.items())
        self.training_cpu = (self.runner_cpu_s + self.conmon_cpu_s, time.monotonic() - wall0)

    _coordinator_down = False

    def sample_retransmissions(self) -> None:
        """Note how many bytes each of the coordinator's TCP connections has sent again so far.

        A byte sent again crosses the veth (and its counters) twice but reaches the agent once, so
        on a lossy link the kernel's downlink count exceeds fedge's by what was retransmitted.
        ``ss`` reads each socket's TCP_INFO every second; what a connection resends after the last
        sample before it closes is missed, so the figure is a lower bound.
        """
        out = subprocess.run(["ss", "-tinH", "src", self.bridge_ip], capture_output=True, text=True,
                             check=False).stdout
        key: tuple[str, str] | None = None
        for line in out.splitlines():
            if not line[:1].isspace():
                addresses = _ADDRESS.findall(line)
                key = (addresses[0], addresses[1]) if len(addresses) >= 2 else None
            elif key is not None:
                found = _RETRANS.search(line)
                if found:
                    self.retransmitted[key] = max(self.retransmitted.get(key, 0), int(found.group(1)))

    def _conmon_cpu(self) -> dict[int, float]:
        """CPU seconds so far of each container's conmon (Podman's monitor process), by pid."""
        out = _podman("inspect", "--format", "{{.State.ConmonPid}}", *(d.container for d in self.devices),
                      check=False)
        pids = [int(p) for p in out.split() if p.isdigit() and int(p) > 0]
        return {pid: cpu for pid in pids if (cpu := process_cpu_s(pid)) is not None}

    # --- faults -----------------------------------------------------------------------------
    def fire_faults(self, status: dict[str, Any] | None) -> None:
        for f in due(self.faults, status, agents_started=self.agents_started, now=time.time()):
            self._fire(f)

    def _targets(self, f: Fault) -> list[_Device]:
        target = f.spec.target
        return [d for d in self.devices if target in (d.spec.name, d.spec.group)]

    def _fire(self, f: Fault) -> None:
        s = f.spec
        devices = self._targets(f)
        f.targets = [d.spec.name for d in devices]
        what = f"{s.action} {s.target or ''}".strip()
        self.say(f"fault: {what} (round {f.round_at_fire})")
        logger.info("fault fired: %s", what)
        if s.action == "kill-coordinator":
            assert self.coordinator is not None
            cpu = process_cpu_s(self.coordinator.pid) or 0.0
            self.coordinator_cpu_s += cpu
            self.reaped_cpu_s += cpu
            self._coordinator_down = True
            self.coordinator.send_signal(signal.SIGKILL)
            self.coordinator.wait()
            f.outcome = "coordinator killed (SIGKILL)"
            if s.restart:
                f.undo_at = time.time() + s.restart_after_s
                f.undo = self._restart_coordinator
        elif s.action == "kill-agent":
            for d in devices:
                d.held_down = True
                _podman("kill", "-s", "KILL", d.container, check=False)
            f.outcome = "agent killed (SIGKILL)"
            if s.restart:
                f.undo_at = time.time() + s.restart_after_s
                f.undo = lambda: self._restart_agents(devices)
        elif s.action == "link-down":
            for d in devices:
                self.host.link(d.host_end, False)
            f.undo_at = time.time() + float(s.for_s or 0.0)
            f.undo = lambda: self._each(devices, lambda d: self.host.link(d.host_end, True))
            f.outcome = f"link down for {s.for_s:g} s"
        elif s.action == "rate":
            for d in devices:
                self._shape(d, s.rate_bps)
            f.outcome = f"rate set to {s.rate_bps} bit/s"
            if s.for_s:
                f.undo_at = time.time() + s.for_s
                f.undo = lambda: self._each(devices, lambda d: self._shape(d, d.spec.link.rate_bps))
        elif s.action == "fill-disk":
            fills = [f"{d.spec.name} {fill_disk(d.disk, s.size_bytes) / 1e6:.0f} MB" for d in devices]
            f.outcome = "disk filled: " + ", ".join(fills)
            f.undo_at = time.time() + float(s.for_s or 0.0)
            f.undo = lambda: self._each(devices, lambda d: (d.disk / FILL_FILE).unlink(missing_ok=True))
        elif s.action == "fill-memory":
            for d in devices:
                size = s.size_bytes or d.spec.memory_bytes
                self._execs.append(subprocess.Popen(
                    ["podman", "exec", d.container, *memory_hog(size, float(s.for_s or 0.0))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=podman_env(),
                    start_new_session=True))
            f.outcome = "memory taken inside the container"
            f.undo_at = time.time() + float(s.for_s or 0.0)
        else:  # pragma: no cover - the spec refuses other actions
            raise LabError(f"unknown fault action {s.action!r}")

    @staticmethod
    def _each(devices: list[_Device], action: Callable[[_Device], None]) -> None:
        for d in devices:
            action(d)

    def _restart_coordinator(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is None:
            return  # another fault's restart brought it back already
        self.coordinator_restarts += 1
        self.say("coordinator: restarting")
        self.start_coordinator()
        self._coordinator_down = False

    def _restart_agents(self, devices: list[_Device]) -> None:
        for d in devices:
            _podman("start", d.container)
            d.restarts += 1
            d.held_down = False

    def undo_faults(self, *, now: float | None = None) -> None:
        """Undo each fault whose time is up (all of them when ``now`` is infinite)."""
        now = time.time() if now is None else now
        for f in self.faults:
            if f.undo_at is not None and f.undone_unix is None and now >= f.undo_at:
                if f.undo is not None:
                    f.undo()
                f.undone_unix = time.time()

    def end_faults(self) -> None:
        """Undo every fault still in force (a link still down, a disk still full, an agent still
        held down), so the agents can hear that training is over and write their last counts."""
        self.undo_faults(now=float("inf"))

    # --- results ----------------------------------------------------------------------------
    def wait_agents(self, timeout_s: float = _AGENT_EXIT_S) -> None:
        """Let the agents hear "training is over" and exit on their own (writing their final byte
        counts), then stop any still running."""
        deadline = time.monotonic() + timeout_s
        while self.running_agents() != set() and time.monotonic() < deadline:
            time.sleep(0.5)
        for d in self.devices:
            _podman("stop", "-t", "10", d.container, check=False)

    def collect(self) -> Collected:
        self.sample_retransmissions()
        counters = {d.spec.name: self.host.counters(d.host_end) for d in self.devices}
        dropped = {d.spec.name: self.host.dropped(d.netns) for d in self.devices}
        wires = {}
        for d in self.devices:
            log = self.out / "logs" / f"{d.spec.name}.log"
            out = subprocess.run(["podman", "logs", d.container], capture_output=True, env=podman_env(),
                                 check=False)
            log.write_bytes(out.stdout + out.stderr)
            wires[d.spec.name] = final_wire_counts(
                _read_wire(d.disk / "wire.json"), (out.stdout + out.stderr).decode(errors="replace"))
        with Store(self.store_dir) as store:
            attempts = store.rounds()
            updates = {(r.round, r.attempt): store.updates(r.round, r.attempt) for r in attempts}
            profiles = {row.device_id: dict(row.profile) for row in store.devices()}
        return Collected(counters=counters, dropped=dropped, wires=wires, attempts=attempts,
                         updates=updates, profiles=profiles)

    def stop(self) -> None:
        for d in self.devices:
            _podman("stop", "-t", "5", d.container, check=False)
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator_cpu_s += process_cpu_s(self.coordinator.pid) or 0.0
            self.coordinator.send_signal(signal.SIGTERM)
            try:
                self.coordinator.wait(15)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()
                self.coordinator.wait()
        for proc in self._execs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for log in self._logs:
            log.close()
        if getattr(self, "_http", None) is not None:
            self._http.close()

    def report(self, collected: Collected | None, *, error: str | None, left: list[str],
               simulated: float | None) -> dict[str, Any]:
        rounds, per_device = rounds_and_devices(collected, [d.spec.name for d in self.devices])
        lab_accuracy = next((r["accuracy"] for r in reversed(rounds) if r["state"] == "complete"
                             and r["accuracy"] is not None), None)
        cpu, wall = self.training_cpu or (0.0, 0.0)
        devices = []
        for d in self.devices:
            w = {} if collected is None else collected.wires[d.spec.name]
            kernel = None if collected is None else kernel_view(
                d.address, collected.counters[d.spec.name], collected.dropped[d.spec.name],
                self.retransmitted)
            fedge: dict[str, Any] = {
                "sent": int(w.get("sent", 0)), "received": int(w.get("received", 0)),
                "connections": int(w.get("connections", 0)), "source": w.get("source"),
            }
            agreement = None if kernel is None else {
                "up": ratio(fedge["sent"], kernel["payload_up"]),
                "down": ratio(fedge["received"], kernel["payload_down"]),
            }
            spec = d.spec
            devices.append({
                "name": spec.name, "group": spec.group, "arch": spec.arch, "cpus": spec.cpus,
                "memory_bytes": spec.memory_bytes, "disk_bytes": spec.disk_bytes,
                "rate_bps": spec.link.rate_bps, "loss": spec.link.loss, "restarts": d.restarts,
                "kernel": kernel, "fedge": fedge, "agreement": agreement, **per_device[spec.name],
                # What the agent itself reported (architecture, cores, memory, its capability benchmark).
                "profile": None if collected is None else collected.profiles.get(spec.name),
            })
        faults = []
        for f in self.faults:
            s = f.spec
            since = f.undone_unix if f.undone_unix is not None else f.fired_unix
            recovered, recovery_s = recovery(s.action, f.targets, since, collected)
            if f.fired_unix is not None and recovered is None:
                f.outcome += "; nothing recovered before the run ended"
            faults.append({
                "at": {"round": s.at_round} if s.at_round is not None else {"s": s.at_s},
                "action": s.action, "target": s.target, "fired_unix": f.fired_unix,
                "round_at_fire": f.round_at_fire, "ended_unix": f.undone_unix, "recovered_unix": recovered,
                "recovery_s": recovery_s, "targets": f.targets,
                "outcome": f.outcome,
            })
        return {
            "lab": {"name": self.name, "spec": str(self.spec.path), "started_unix": self.started_unix,
                    "wall_s": round(time.time() - self.started_unix, 3), "ok": error is None and not left,
                    "error": error, "leftovers": left, "timeline_s": run_timeline(self),
                    "coordinator": {"address": self.url, "restarts": self.coordinator_restarts,
                                    "cpu_s": round(self.coordinator_cpu_s, 3)}},
            "devices": devices,
            "rounds": rounds,
            "faults": faults,
            "comparison": {"simulated_accuracy": simulated, "lab_accuracy": lab_accuracy,
                           "difference": None if simulated is None or lab_accuracy is None
                           else round(lab_accuracy - simulated, 4)},
            "overhead": {"lab_cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                         "runner_cpu_s": round(self.runner_cpu_s, 3),
                         "conmon_cpu_s": round(self.conmon_cpu_s, 3),
                         "status_polls": len(self.poll_s),
                         "status_poll_ms_max": round(1000 * max(self.poll_s, default=0.0), 1),
                         "share_of_one_core": round(cpu / wall, 4) if wall else None},
        }


def run_timeline(run: LabRun) -> dict[str, float]:
    return dict(sorted(run.timeline.items(), key=lambda kv: kv[1]))


def run_lab(spec: LabSpec, *, out_dir: Path, progress: Callable[[str], None] = lambda _m: None,
            compare: bool = True) -> dict[str, Any]:
    """Run the lab ``spec`` to the end and tear it down; return the report (also in ``out_dir``).

    Ctrl-C (SIGINT) and SIGTERM stop the run and tear everything down before returning.

    Raises:
        LabError: a prerequisite is missing, a lab of this name is already up, or the run failed
            (the report is written first, with the error in it).
    """
    require(spec.arches)
    if state_path(spec.lab.name).exists():
        raise LabError(f"a lab named {spec.lab.name!r} is up or was not torn down "
                       f"({state_path(spec.lab.name)}); run `fedge lab down {spec.lab.name}` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    error: str | None = None
    collected: Collected | None = None
    with _signals_raise():
        run = LabRun(spec, out_dir=out_dir, progress=progress)
        try:
            run.prepare()
            run.network()
            run.start_coordinator()
            run.mark("coordinator_up")
            run.say(f"coordinator up on {run.url}; starting {len(run.devices)} agents")
            run.train()
            run.end_faults()
            run.wait_agents()
            collected = run.collect()
        except (Exception, KeyboardInterrupt) as e:  # the run fails; teardown and the report still come
            if isinstance(e, KeyboardInterrupt):
                error = "interrupted"
            else:
                error = str(e) if isinstance(e, FedgeError) else f"{type(e).__name__}: {e}"
            logger.error("lab run failed: %s", error)
            with contextlib.suppress(Exception):
                run.end_faults()
            with contextlib.suppress(Exception):
                collected = run.collect()
        finally:
            # A second Ctrl-C or SIGTERM must not cut the teardown short: both wait until it is done.
            with _signals_held():
                with contextlib.suppress(Exception):
                    run.stop()
                progress("tearing down")
                result = teardown(run.state)
                for failure in result.failures:
                    progress(f"teardown: {failure}")
                if not result.failures:
                    forget(spec.lab.name)
        try:
            left = leftovers(spec.lab.name)
        except (FedgeError, OSError) as e:
            left = [f"could not look: {e}"]
        simulated = None
        if compare and error is None:
            try:
                simulated = _simulate(spec, out_dir)
            except (Exception, KeyboardInterrupt) as e:
                logger.warning("no comparison simulation: %s", e)
        report = run.report(collected, error=error, left=left, simulated=simulated)
        write_report(out_dir, report)
    if error is not None:
        raise LabError(f"lab {spec.lab.name!r} failed: {error} (report in {out_dir})")
    return report


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored for the duration (teardown), then handled as before."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C for the duration: the run unwinds through its teardown."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _simulate(spec: LabSpec, out_dir: Path) -> float | None:
    """The final accuracy of a plain simulation of the same partitions and settings, or None."""
    try:
        simulate = simulate_args(spec)
    except FedgeError as e:
        logger.warning("no comparison simulation: %s", e)
        return None
    with tempfile.TemporaryDirectory(prefix="fedge-lab-sim-") as tmp:
        args = [sys.executable, "-m", "fedge.cli", "simulate", *simulate, "--out", tmp]
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=600)
        (out_dir / "logs" / "simulate.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            logger.warning("the comparison simulation failed: %s", done.stderr.strip()[-500:])
            return None
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        accuracy = summary.get("accuracy")
        return None if accuracy is None else float(accuracy)


def _podman(*args: str, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), check=False,
                          timeout=300)
    if check and done.returncode != 0:
        raise LabError(f"podman {' '.join(args[:2])} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def _read_wire(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _own_cpu_s() -> float:
    """This process's CPU and that of the commands it ran (ip, tc, podman), coordinator excluded."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _progress_line(status: dict[str, Any], devices: int) -> str:
    done, total = status["rounds_complete"], status["rounds"]
    line = f"rounds {done}/{total}, {status['devices']}/{devices} devices checked in"
    if status.get("open"):
        o = status["open"]
        line += f"; round {o['round']} (attempt {o['attempt']}): {o['reported']}/{o['invited']} reported"
    history = [h for h in status.get("history") or [] if h.get("state") == "complete" and "accuracy" in h]
    if history:
        line += f"; accuracy {history[-1]['accuracy']:.4f}"
    return line

"""The CI lab, for real: ``fedge lab run deploy/lab/ci.toml`` as a user runs it (``make test-lab``).

A coordinator and four devices, two of them emulated arm64 containers, one on
a 1 Mbit link with 5 % loss, one with a 20 s outage mid-round, secure
aggregation on, and the coordinator killed with SIGKILL after round 2 and
started again. The test checks what the issue promises of such a run: every
round completed exactly once, the accuracy of a plain simulation of the same
partitions, the kernel's byte counts and the agents' own within 5 %, every
fault fired and recovered from, and nothing left on the host afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fedge_processes import FEDGE, child_env

from fedge.lab.host import leftovers
from fedge.lab.spec import load_spec
from fedge.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.lab]

SPEC = Path(__file__).resolve().parents[2] / "deploy" / "lab" / "ci.toml"
# The lab's final accuracy against a plain simulation of the same partitions: secure aggregation's
# quantization and a device missing its outage round move it a little, not more.
ACCURACY_TOLERANCE = 0.05
BYTES_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], str]:
    if os.geteuid() != 0:
        pytest.skip("fedge lab needs root (network namespaces, tc, iptables, Podman)")
    check = subprocess.run([FEDGE, "lab", "check", str(SPEC)], capture_output=True, text=True,
                           env=child_env(), check=False)
    assert check.returncode == 0, f"fedge lab check found something missing:\n{check.stdout}{check.stderr}"
    out = tmp_path_factory.mktemp("lab")
    done = subprocess.run([FEDGE, "lab", "run", str(SPEC), "--out", str(out)], capture_output=True, text=True,
                          env=child_env(), check=False, timeout=2400)
    log = f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert (out / "report.json").exists(), log
    report = json.loads((out / "report.json").read_text())
    assert done.returncode == 0, f"{log}\nreport error: {report['lab']['error']}"
    return out, report, log


def test_every_round_completes_exactly_once_through_the_coordinator_kill(
    lab_run: tuple[Path, dict[str, object], str],
) -> None:
    out, report, _ = lab_run
    spec = load_spec(SPEC)
    with Store(out / "coordinator") as store:
        complete = [r.round for r in store.rounds() if r.state == "complete"]
        assert sorted(complete) == list(range(1, spec.rounds + 1))
        # Every round ran under secure aggregation: the coordinator saw only sums.
        for row in store.rounds():
            if row.state == "complete":
                assert "secagg_survivors" in row.metrics
    lab = report["lab"]
    assert isinstance(lab, dict)
    assert lab["coordinator"]["restarts"] == 1


def test_the_lab_reaches_the_accuracy_of_a_plain_simulation(
    lab_run: tuple[Path, dict[str, object], str],
) -> None:
    _, report, _ = lab_run
    comparison = report["comparison"]
    assert isinstance(comparison, dict)
    assert comparison["simulated_accuracy"] is not None and comparison["lab_accuracy"] is not None
    difference = abs(comparison["lab_accuracy"] - comparison["simulated_accuracy"])
    assert difference <= ACCURACY_TOLERANCE, comparison


def test_the_kernels_byte_counts_and_the_agents_agree(lab_run: tuple[Path, dict[str, object], str]) -> None:
    _, report, _ = lab_run
    devices = report["devices"]
    assert isinstance(devices, list) and len(devices) == 4
    for d in devices:
        assert d["kernel"]["rx_bytes"] > 0 and d["fedge"]["sent"] > 0, d
        for direction in ("up", "down"):
            ratio = d["agreement"][direction]
            assert ratio is not None and abs(ratio - 1.0) <= BYTES_TOLERANCE, (d["name"], direction, d)


def test_arm64_devices_ran_aarch64_code_within_their_limits(
    lab_run: tuple[Path, dict[str, object], str],
) -> None:
    _, report, _ = lab_run
    devices = report["devices"]
    assert isinstance(devices, list)
    arches = {d["name"]: (d["arch"], d["profile"]["arch"]) for d in devices}
    assert sorted(a for a, _ in arches.values()) == ["amd64", "amd64", "arm64", "arm64"]
    for name, (arch, machine) in arches.items():
        assert machine == {"amd64": "x86_64", "arm64": "aarch64"}[arch], (name, machine)
    for d in devices:
        assert d["rounds_completed"] >= 1, d


def test_every_fault_fired_and_the_federation_recovered(
    lab_run: tuple[Path, dict[str, object], str],
) -> None:
    _, report, _ = lab_run
    faults = report["faults"]
    assert isinstance(faults, list) and {f["action"] for f in faults} >= {"kill-coordinator", "link-down"}
    for f in faults:
        assert f["fired_unix"] is not None, f
        assert f["recovery_s"] is not None and f["recovery_s"] >= 0, f


def test_teardown_left_nothing_behind(lab_run: tuple[Path, dict[str, object], str]) -> None:
    out, report, _ = lab_run
    assert report["lab"]["leftovers"] == []
    assert leftovers(load_spec(SPEC).lab.name) == []
    html = (out / "report.html").read_text()
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org", "")


def _small_spec(tmp_path: Path, name: str) -> Path:
    """Two amd64 devices and more rounds than the test waits for: a lab that is still running."""
    spec = tmp_path / f"{name}.toml"
    spec.write_text(f"""
[lab]
name = "{name}"
subnet = "10.216.0.0/24"
[data]
source = "digits"
[federation]
task = {{ name = "logreg" }}
rounds = {{ count = 500, cohort_size = 2, min_devices = 2, deadline_s = 60.0, wait_s = 0.5 }}
[[group]]
name = "gw"
count = 2
arch = "amd64"
cpus = 0.5
memory = "256m"
""")
    return spec


def _start_lab(spec: Path, out: Path) -> subprocess.Popen[bytes]:
    """``fedge lab run`` in the background, once its agents train (everything the lab makes exists)."""
    out.mkdir()
    log = out.parent / "lab.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([FEDGE, "lab", "run", str(spec), "--out", str(out), "--no-compare"],
                                stdout=sink, stderr=subprocess.STDOUT, env=child_env())
    deadline = time.monotonic() + 300
    while "accuracy" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the lab did not start training:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


@pytest.mark.parametrize("how", ["interrupt", "kill-then-down"])
def test_a_lab_stopped_mid_run_leaves_nothing_behind(tmp_path: Path, how: str) -> None:
    """Ctrl-C tears the lab down itself; after a SIGKILL of the runner, `fedge lab down` does."""
    if os.geteuid() != 0:
        pytest.skip("fedge lab needs root (network namespaces, tc, iptables, Podman)")
    name = "stop1" if how == "interrupt" else "stop2"
    proc = _start_lab(_small_spec(tmp_path, name), tmp_path / "out")
    try:
        assert leftovers(name) != []  # it is up
        status = subprocess.run([FEDGE, "lab", "status"], capture_output=True, text=True, env=child_env(),
                                check=True).stdout
        assert f"{name}: running" in status
        if how == "interrupt":
            proc.send_signal(signal.SIGINT)
            assert proc.wait(120) != 0
            report = json.loads((tmp_path / "out" / "report.json").read_text())
            assert report["lab"]["error"] == "interrupted" and report["lab"]["leftovers"] == []
        else:
            proc.kill()
            proc.wait(30)
            assert leftovers(name) != []  # a killed runner cannot clean up after itself
            down = subprocess.run([FEDGE, "lab", "down", name], capture_output=True, text=True,
                                  env=child_env(), check=False)
            assert down.returncode == 0, down.stderr
        assert leftovers(name) == []
        status = subprocess.run([FEDGE, "lab", "status"], capture_output=True, text=True, env=child_env(),
                                check=True).stdout
        assert name not in status
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([FEDGE, "lab", "down", name], capture_output=True, env=child_env(), check=False)

"""The real agent's wire counts: ``wire.json`` against a relay that counted the same TCP streams.

A TLS coordinator (real processes, mutual TLS, enrolment by token) and one
``fedge agent`` whose every connection goes through a counting relay. The
agent is killed with SIGKILL in the middle of training (its file then lags
the relay by at most about a second of traffic), restarted on the same state
directory through a second relay, and runs to the end: what it counted in its
second life is exactly what the second relay saw.
"""

from __future__ import annotations

import json
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fedge_processes import DigitsFiles, Processes
from test_tls import Coordinator, token

# The relay is shared with the unit tests of the meter.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from wire_relay import Relay

pytestmark = pytest.mark.slow

# A TLS 1.3 close_notify record, which the server may send after the agent closed: never readable by it.
_CLOSE_NOTIFY = 24


def _counts(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_the_agent_counts_its_bytes_across_a_kill_and_a_restart(
    tmp_path: Path, procs: Processes, digits: Callable[[int], DigitsFiles]
) -> None:
    files = digits(1)
    coord = Coordinator(tmp_path, procs, files, rounds=30, agents=1)
    try:
        _kill_and_restart(tmp_path, procs, files, coord)
    finally:
        coord.admin.close()


def _kill_and_restart(tmp_path: Path, procs: Processes, files: DigitsFiles, coord: Coordinator) -> None:
    (tmp_path / "dev-a.token").write_text(token(coord.data_dir, "--device-id", "dev-a"))
    state = procs.root / "state" / "dev-a"
    wire = state / "wire.json"

    with Relay(("127.0.0.1", coord.port)) as first:
        agent = procs.agent("dev-a", f"https://127.0.0.1:{first.port}", files.devices[0], "--ca-cert",
                            str(coord.ca_file), "--token-file", str(tmp_path / "dev-a.token"))
        deadline = time.monotonic() + 60
        # Written while traffic flows, not only at exit (once a second, so it may
        # lag the rounds by a write): enrolment, then the mutual-TLS connection.
        while (coord.status()["rounds_complete"] < 2 or not wire.exists()
               or _counts(wire)["connections"] < 2):
            assert time.monotonic() < deadline and agent.alive(), procs.logs()
            time.sleep(0.1)
        agent.send(signal.SIGKILL)
        agent.wait(10)
        first.wait_idle()
    killed = _counts(wire)
    # At most about one second of traffic is lost: a few check-ins, or a round's params and update.
    assert 0 <= first.up - killed["sent"] < 256 * 1024, (first.up, killed)
    assert 0 <= first.down - killed["received"] < 256 * 1024, (first.down, killed)
    assert killed["connections"] <= first.accepted

    with Relay(("127.0.0.1", coord.port)) as second:
        again = procs.start(
            "dev-a-restarted", "agent", "--coordinator", f"https://127.0.0.1:{second.port}",
            "--data", str(files.devices[0]), "--state-dir", str(state), "--device-id", "dev-a",
            "--ca-cert", str(coord.ca_file), "--log-format", "json",
        )
        assert coord.proc.wait(120) == 0, procs.logs()
        assert again.wait(30) == 0, procs.logs()
        second.wait_idle()
    final = _counts(wire)
    assert final["sent"] - killed["sent"] == second.up
    assert 0 <= second.down - (final["received"] - killed["received"]) <= _CLOSE_NOTIFY * second.accepted
    assert final["connections"] - killed["connections"] == second.accepted
    assert second.up > 10_000 and second.down > 10_000  # it trained: params down, updates up
    assert stat.S_IMODE(wire.stat().st_mode) == 0o644
    assert abs(final["updated_unix"] - time.time()) < 60
    # The same totals in its last log line, for when wire.json cannot be written (a full disk).
    stop = [json.loads(line) for line in again.log.read_text().splitlines()
            if line.startswith("{") and '"event": "stop"' in line]
    assert len(stop) == 1, again.log.read_text()[-2000:]
    assert (stop[0]["wire_sent"], stop[0]["wire_received"], stop[0]["wire_connections"]) == (
        final["sent"], final["received"], final["connections"])

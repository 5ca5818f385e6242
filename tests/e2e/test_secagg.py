"""Secure aggregation with real processes over mutual TLS on 127.0.0.1: dropouts and a coordinator crash.

``fedge ca init``, a server certificate, a one-time token per agent; the
coordinator runs with ``[secagg] enabled = true``, so every round is SecAgg+
between the ``fedge agent`` processes (each enrols, makes its own key and
speaks mutual TLS). One test SIGKILLs an agent after it shared its keys and
before it uploaded: the round completes with the others (its pairwise masks
rebuilt from their shares). The other SIGKILLs the coordinator mid-round:
the restarted one runs that round again as a new attempt with fresh keys,
and every round completes exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fedge_processes import FEDGE, DigitsFiles, Proc, Processes, child_env, free_port, toml_config

from fedge import pki
from fedge.store import Store

pytestmark = pytest.mark.slow

_EXIT_S = 30.0


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDGE, *args], capture_output=True, text=True, env=child_env(), timeout=60,
                          check=False)


class SecureFederation:
    """A TLS coordinator with ``[secagg]`` on, and the agents it enrols."""

    def __init__(self, root: Path, procs: Processes, digits: DigitsFiles, *, rounds: int,
                 rounds_table: dict[str, Any], secagg: dict[str, Any], local_epochs: int = 1) -> None:
        self.root, self.procs, self.digits = root, procs, digits
        self.data_dir = root / "store"
        for args in (("ca", "init"), ("ca", "issue-server", "--host", "localhost", "--ip", "127.0.0.1")):
            result = fedge(*args, "--data-dir", str(self.data_dir))
            assert result.returncode == 0, result.stderr
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_file = self.data_dir / "ca" / "ca.crt"
        self.config = root / "coordinator.toml"
        self.config.write_text(toml_config({
            "task": {"name": "logreg", "eval_data": str(digits.test)},
            "strategy": {"name": "fedavg"},
            "rounds": {"count": rounds, "wait_s": 0.25, **rounds_table},
            "train": {"local_epochs": local_epochs, "batch_size": 32, "lr": 0.1},
            "server": {"host": "127.0.0.1", "port": self.port, "data_dir": str(self.data_dir)},
            "secagg": {"enabled": True, **secagg},
        }))
        admin = (self.data_dir / "admin.token").read_text().strip()
        self.admin = httpx.Client(base_url=self.url, verify=pki.client_ssl_context(ca_file=self.ca_file),
                                  headers={"authorization": f"Bearer {admin}"})
        self.coordinator = self.start("coordinator")

    def start(self, name: str) -> Proc:
        proc = self.procs.start(name, "coordinator", "--config", str(self.config), "--exit-when-done")
        deadline = time.monotonic() + 60
        while True:
            assert proc.alive() and time.monotonic() < deadline, self.procs.logs()
            try:
                if self.admin.get("/healthz", timeout=1.0).status_code == 200:
                    return proc
            except httpx.TransportError:
                time.sleep(0.1)

    def agent(self, name: str, data: Path) -> Proc:
        tok = fedge("token", "create", "--data-dir", str(self.data_dir), "--device-id", name)
        assert tok.returncode == 0, tok.stderr
        path = self.root / f"{name}.token"
        path.write_text(tok.stdout.strip())
        return self.procs.agent(name, self.url, data, "--ca-cert", str(self.ca_file),
                                "--token-file", str(path))

    def status(self) -> dict[str, Any] | None:
        try:
            r = self.admin.get("/v1/status", timeout=5.0)
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None  # type: ignore[no-any-return]

    def wait_for(self, what: str, cond: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0
                 ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and cond(status):
                return status
            assert self.coordinator.alive(), f"the coordinator exited waiting for {what}\n{self.procs.logs()}"
            time.sleep(0.05)
        raise AssertionError(f"not reached in {timeout_s} s: {what}\n{self.procs.logs()}")

    def finish(self, agents: list[Proc]) -> None:
        code = self.coordinator.wait(_EXIT_S, context=f" after training ended\n{self.procs.logs()}")
        assert code == 0, self.procs.logs()
        for proc in (self.coordinator, *agents):
            assert "Traceback" not in proc.text(), self.procs.logs()
        for agent in agents:
            assert agent.wait(_EXIT_S, context=f"\n{self.procs.logs()}") == 0, self.procs.logs()
            assert "training is over" in agent.text(), self.procs.logs()

    def close(self) -> None:
        self.admin.close()


def _slow_data(files: DigitsFiles, root: Path) -> Path:
    """One device's share of the digits, repeated: a device that trains (and evaluates) longer."""
    with np.load(files.devices[-1]) as d:
        x, y = d["x"], d["y"]
    path = root / "slow.npz"
    np.savez(path, x=np.tile(x, (100, 1)), y=np.tile(y, 100))
    return path


def test_an_agent_killed_after_sharing_its_keys_is_unmasked_around(
    tmp_path: Path, procs: Processes, digits: Callable[[int], DigitsFiles]
) -> None:
    files = digits(5)
    fed = SecureFederation(
        tmp_path, procs, files, rounds=5,
        rounds_table={"cohort_size": 5, "min_updates": 3, "min_devices": 4, "deadline_s": 20.0},
        secagg={"advertise_s": 5.0, "share_s": 5.0, "unmask_s": 5.0},
        local_epochs=20,  # the victim, with 100 times the data, trains for seconds: the window to kill it in
    )
    try:
        # The victim first, so that it is in the first rounds' cohorts.
        victim = fed.agent("victim", _slow_data(files, tmp_path))
        fed.wait_for("the victim checked in", lambda s: s["devices"] >= 1)
        honest = [fed.agent(f"agent-{i}", files.devices[i]) for i in range(4)]

        def keys_shared(s: dict[str, Any]) -> bool:
            secure = (s["open"] or {}).get("secagg")
            return secure is not None and secure["phase"] == "upload" and secure["shared"] == 5

        # Every key shared (the victim's among them): the victim is now evaluating, training or
        # uploading. Frozen at once, then killed: it never uploads, or never answers the unmask request.
        status = fed.wait_for("a round with every key shared", keys_shared)
        assert status["open"]["round"] <= 3, status  # rounds follow without the victim
        victim.send(signal.SIGSTOP)
        victim.send(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        killed_in = (status["open"]["round"], status["open"]["attempt"])
        status = fed.wait_for("training done", lambda s: s["state"] == "done", timeout_s=120)
        fed.finish(honest)
    finally:
        fed.close()
    history = status["history"]
    assert [h["round"] for h in history if h["state"] == "complete"] == [1, 2, 3, 4, 5], history
    (hit,) = [h for h in history if (h["round"], h["attempt"]) == killed_in]
    assert hit["state"] == "complete", hit
    if hit["reported"] == 4:  # killed before its masked vector arrived: its mask key was rebuilt
        assert hit["dropped"] == ["victim"] and hit["secagg_dropped_upload"] == 1, hit
    else:  # killed after uploading: the others' shares rebuilt its self-mask
        assert hit["reported"] == 5 and hit["secagg_dropped_unmask"] == 1, hit
    assert sum(hit[f"secagg_dropped_{p}"] for p in ("advertise", "share", "upload", "unmask")) == 1, hit
    later = [h for h in history if h["round"] > killed_in[0]]
    assert later and all(h["invited"] == 4 and h["reported"] == 4 for h in later), later
    accuracy = [h["accuracy"] for h in history]
    assert accuracy[-1] > 0.8 and accuracy[-1] >= accuracy[0], accuracy
    with Store(fed.data_dir) as store:
        stats = store.round_stats()
    assert sum(stats.secagg_dropped.values()) == 1 and sum(stats.secagg_aborted.values()) == 0, stats


def test_a_coordinator_killed_mid_secure_round_restarts_it_and_completes_every_round_once(
    tmp_path: Path, procs: Processes, digits: Callable[[int], DigitsFiles]
) -> None:
    files = digits(5)
    rounds = 6
    fed = SecureFederation(
        tmp_path, procs, files, rounds=rounds,
        rounds_table={"cohort_size": 5, "min_updates": 4, "min_devices": 5, "deadline_s": 12.0},
        secagg={"advertise_s": 3.0, "share_s": 3.0, "unmask_s": 3.0},
    )
    try:
        agents = [fed.agent(f"agent-{i}", path) for i, path in enumerate(files.devices)]
        fed.wait_for("round 1 complete", lambda s: s["rounds_complete"] >= 1)
        # An agent frozen after it shared its keys and before it uploaded keeps the round open in
        # its upload phase until the deadline, with the others' masked vectors in: the window to
        # kill the coordinator in. Freezing it in that gap (its training, some milliseconds) can
        # come too late, when it has uploaded already; then the round ends and the next is tried.
        laggard = agents[-1]
        killed = None
        for _ in range(rounds - 2):
            start = fed.wait_for("a secure round in its upload phase", lambda s: (
                (s["open"] or {}).get("secagg", {}).get("phase") == "upload"
                and s["open"]["secagg"]["shared"] == 5), timeout_s=60)
            trying = start["open"]["round"]
            laggard.send(signal.SIGSTOP)
            try:
                def others_in(s: dict[str, Any], trying: int = trying) -> bool:
                    secure = (s["open"] or {}).get("secagg") or {}
                    return bool(s["state"] == "done" or (s["open"] or {}).get("round") != trying
                                or (secure.get("phase") == "upload" and secure["uploaded"] >= 4))

                status = fed.wait_for("the others' masked vectors in, or the round over", others_in,
                                      timeout_s=30)
                if (status["open"] or {}).get("round") == trying:
                    fed.coordinator.send(signal.SIGKILL)
                    assert fed.coordinator.wait(10) == -signal.SIGKILL
                    killed = trying
                    break
            finally:
                laggard.send(signal.SIGCONT)
        assert killed is not None, "the laggard uploaded before it was frozen in every try"
        with Store(fed.data_dir) as store:
            (row,) = [r for r in store.rounds() if r.state == "open"]
            assert (row.round, row.attempt) == (killed, 1)
            assert store.updates(killed, 1), "no masked vector was recorded before the kill"
        fed.coordinator = fed.start("coordinator-2")
        status = fed.wait_for("training done after the restart", lambda s: s["state"] == "done",
                              timeout_s=120)
        fed.finish(agents)
    finally:
        fed.close()
    with Store(fed.data_dir) as store:
        rows = store.rounds()
    assert [r.round for r in rows if r.state == "complete"] == list(range(1, rounds + 1)), rows  # once each
    assert [(r.attempt, r.state) for r in rows if r.round == killed] == [(1, "interrupted"), (2, "complete")]
    assert {r.state for r in rows} == {"complete", "interrupted"}, rows
    for r in rows:
        if r.state == "complete":
            assert r.metrics["secagg_survivors"] == len(r.reported) >= 4, r
    assert f"resuming after round {killed - 1}" in fed.coordinator.text()

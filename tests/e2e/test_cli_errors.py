"""``fedge`` as an operator meets it: bad input ends in one error line, signals end processes cleanly.

Every refusal here exits with status 2 and one line ``fedge: error: ...``
naming the problem, never a traceback. The agent is a service: before that
line it may have written log records (the plain-HTTP warning, its check-in),
which are allowed when they are well-formed log records. ``fedge demo`` is
run to completion and interrupted with SIGINT, and must leave no process behind.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fedge_processes import (
    FEDGE,
    DigitsFiles,
    Processes,
    child_env,
    coordinator_config,
    free_port,
    pids_mentioning,
    start_coordinator,
    toml_config,
)
from safetensors.numpy import load_file

_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) [\w.]+: ")


def run_fedge(*args: str, cwd: Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``fedge ARGS`` to its end (killed past ``timeout_s``), capturing stdout and stderr apart."""
    return subprocess.run(
        [FEDGE, *args],
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def assert_refused(
    result: subprocess.CompletedProcess[str], *needles: str, log_records_before: bool = False
) -> None:
    """Exit status 2; stderr ends in one ``fedge: error:`` line holding every needle; no traceback.

    Without ``log_records_before`` that line is all of stderr; with it, the lines
    before it must be log records (a service logs what it did before failing).
    """
    where = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, where
    assert "Traceback" not in result.stderr + result.stdout, where
    lines = result.stderr.splitlines()
    assert lines, where
    *before, last = lines
    assert last.startswith("fedge: error: "), where
    for needle in needles:
        assert needle in last, (needle, where)
    if log_records_before:
        assert all(_LOG_RECORD.match(line) for line in before), where
    else:
        assert before == [], where


# ------------------------------------------------------------------ coordinator


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[task\nname = 'logreg'\n", ("coordinator.toml", "not valid TOML")),
        (
            "[task]\nname = 'logreg'\nnum_features = 64\nnum_classes = 10\nbogus = 1\n",
            ("coordinator.toml", "unknown key task.bogus"),
        ),
    ],
    ids=["bad-toml", "unknown-key"],
)
def test_a_malformed_coordinator_config_is_one_error_line(
    tmp_path: Path, text: str, needles: tuple[str, ...]
) -> None:
    (tmp_path / "coordinator.toml").write_text(text)
    result = run_fedge("coordinator", "--config", "coordinator.toml", cwd=tmp_path)
    assert_refused(result, *needles)


def test_a_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        toml_config(
            {"task": {"num_features": 64, "num_classes": 10}, "server": {"data_dir": str(tmp_path / "s")}}
        )
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_fedge(
            "coordinator", "--config", str(config), "--port", str(port), "--insecure", cwd=tmp_path
        )
    assert_refused(result, f"port {port}", "already in use")


def test_a_coordinator_without_tls_material_says_how_to_make_it(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        toml_config(
            {"task": {"num_features": 64, "num_classes": 10}, "server": {"data_dir": str(tmp_path / "s")}}
        )
    )
    result = run_fedge("coordinator", "--config", str(config), cwd=tmp_path)
    assert_refused(result, "no TLS material", "fedge ca init", "--insecure")


def test_insecure_mode_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        toml_config(
            {"task": {"num_features": 64, "num_classes": 10}, "server": {"data_dir": str(tmp_path / "s")}}
        )
    )
    result = run_fedge(
        "coordinator", "--config", str(config), "--insecure", "--host", "0.0.0.0", cwd=tmp_path
    )
    assert_refused(result, "loopback only", "--insecure-allow-remote")


def test_an_agent_refuses_plain_http_without_insecure(tmp_path: Path) -> None:
    result = run_fedge(
        "agent",
        "--coordinator",
        "http://127.0.0.1:9",
        "--data",
        "d.npz",
        "--state-dir",
        "state",
        cwd=tmp_path,
    )
    assert_refused(result, "plain HTTP", "--insecure")


# ------------------------------------------------------------------------ agent


def test_an_agent_whose_data_does_not_fit_the_task_stops_with_one_error_line(
    tmp_path: Path, procs: Processes, http: httpx.Client, digits: Callable[[int], DigitsFiles]
) -> None:
    data = digits(2)
    port = free_port()
    config = coordinator_config(
        tmp_path / "coordinator.toml",
        eval_data=data.test,
        data_dir=tmp_path / "store",
        port=port,
        rounds=1,
        cohort_size=2,
        deadline_s=30.0,
    )
    coordinator = start_coordinator(procs, http, config, port)
    wrong = tmp_path / "five-features.npz"
    np.savez(wrong, x=np.zeros((20, 5), np.float32), y=np.arange(20) % 10)
    result = run_fedge(
        "agent", "--coordinator", coordinator.url, "--data", str(wrong), "--state-dir", "state",
        "--device-id", "misfit", "--insecure", cwd=tmp_path,
    )  # fmt: skip
    assert_refused(result, "five-features.npz", "5 features", "expects 64", log_records_before=True)
    assert coordinator.proc.alive(), procs.logs()


def test_an_agent_with_a_missing_data_file_stops_with_one_error_line(tmp_path: Path) -> None:
    result = run_fedge(
        "agent", "--coordinator", f"http://127.0.0.1:{free_port()}", "--insecure", "--data", "nowhere.npz",
        "--state-dir", "state", cwd=tmp_path,
    )  # fmt: skip
    assert_refused(result, "nowhere.npz", "no such file", log_records_before=True)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("coordinator = [\n", ("agent.toml", "not valid TOML")),
        (
            'coordinator = "http://127.0.0.1:9"\ndata = "d.npz"\nstate_dir = "s"\nbakoff_cap_s = 3\n',
            ("agent.toml", "unknown key 'bakoff_cap_s'", "backoff_cap_s"),
        ),
        (
            'coordinator = "ftp://host"\ndata = "d.npz"\nstate_dir = "s"\n',
            ("agent.toml", "'coordinator'", "http:// or https://"),
        ),
    ],
    ids=["bad-toml", "unknown-key", "bad-url"],
)
def test_a_malformed_agent_config_is_one_error_line(
    tmp_path: Path, text: str, needles: tuple[str, ...]
) -> None:
    (tmp_path / "agent.toml").write_text(text)
    assert_refused(run_fedge("agent", "--config", "agent.toml", cwd=tmp_path), *needles)


def test_an_agent_retries_an_unreachable_coordinator_with_growing_delays_until_sigterm(
    tmp_path: Path, procs: Processes, digits: Callable[[int], DigitsFiles]
) -> None:
    base_s, cap_s, retries = 0.1, 1.0, 10
    config = tmp_path / "agent.toml"
    config.write_text(
        f'coordinator = "http://127.0.0.1:{free_port()}"\n'  # nothing listens there
        f"data = {json.dumps(str(digits(2).devices[0]))}\n"
        'state_dir = "state"\n'
        "insecure = true\n"
        f"backoff_base_s = {base_s}\nbackoff_cap_s = {cap_s}\n"
    )
    agent = procs.start("agent", "agent", "--config", str(config))
    retry = re.compile(
        r"coordinator unreachable: POST /v1/check-in: ConnectError .*; retrying in ([0-9.]+) s$"
    )

    def delays() -> list[float]:
        return [float(m.group(1)) for line in agent.text().splitlines() if (m := retry.search(line))]

    deadline = time.monotonic() + 30
    while len(delays()) < retries:
        assert agent.alive(), procs.logs()
        assert time.monotonic() < deadline, procs.logs()
        time.sleep(0.05)
    assert agent.alive(), procs.logs()

    stopped_at = time.monotonic()
    agent.send(signal.SIGTERM)
    assert agent.wait(10) == 0, procs.logs()
    assert time.monotonic() - stopped_at < 5.0
    assert "received SIGTERM" in agent.text(), procs.logs()

    seen = delays()
    # Full jitter: retry i waits uniformly up to min(cap, base * 2**i) (logged to 0.1 s).
    for i, delay in enumerate(seen):
        assert delay <= min(cap_s, base_s * 2**i) + 0.05, (i, seen)
    # Growing: the first two retries wait at most 0.2 s; some later one waits longer
    # (all seven after the third at 0.25 s or less: probability below 1e-4).
    assert max(seen[3:retries]) >= 0.3, seen


# ------------------------------------------------------------------------- demo


def test_the_demo_trains_and_writes_its_outputs(tmp_path: Path, procs: Processes) -> None:
    # As `make demo` runs it: no --out, so a relative runs/DATE-demo folder.
    demo = procs.start("demo", "demo", "--agents", "3", "--rounds", "2", "--quiet", cwd=tmp_path)
    assert demo.wait(120) == 0, procs.logs()
    assert "Traceback" not in demo.text()
    (out,) = (tmp_path / "runs").glob("*-demo")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_complete"] == 2 and summary["devices"] == 3, summary
    assert summary["accuracy"] > 0.5, summary
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["state"]) for m in lines] == [(1, "complete"), (2, "complete")], lines
    assert lines[-1]["accuracy"] == summary["accuracy"]
    # The coordinator counted every upload and download, per round and in total.
    assert summary["bytes_up"] == sum(m["bytes_up"] for m in lines) > 0, lines
    assert summary["bytes_down"] == sum(m["bytes_down"] for m in lines) > 0, lines
    model = load_file(str(out / "model.safetensors"))
    assert model["weight"].shape == (64, 10) and model["bias"].shape == (10,)
    assert pids_mentioning(str(out)) == []


def test_sigint_stops_the_demo_and_every_process_it_started(
    tmp_path: Path, procs: Processes, http: httpx.Client
) -> None:
    out = tmp_path / "demo"
    demo = procs.start("demo", "demo", "--agents", "3", "--rounds", "1000", "--out", str(out))
    config = out / "coordinator.toml"
    deadline = time.monotonic() + 60
    status = None
    while status is None or status["devices"] < 3 or status["rounds_complete"] < 1:
        assert demo.alive() and time.monotonic() < deadline, (status, procs.logs())
        time.sleep(0.05)
        token = out / "coordinator" / "admin.token"
        if (
            config.exists()
            and token.exists()
            and (port := re.search(r"^port = (\d+)$", config.read_text(), re.M))
        ):
            try:
                status = httpx.get(
                    f"https://127.0.0.1:{port.group(1)}/v1/status",
                    verify=_ca_context(out),
                    headers={"authorization": f"Bearer {token.read_text().strip()}"},
                ).json()
            except (httpx.TransportError, OSError):
                status = None
    children = set(pids_mentioning(str(out))) - {demo.pid}
    assert len(children) >= 4, (children, procs.logs())  # the coordinator and three agents

    demo.send(signal.SIGINT)
    assert demo.wait(30) == 130, procs.logs()
    assert "fedge: interrupted" in demo.text(), procs.logs()
    assert "Traceback" not in demo.text(), procs.logs()
    assert pids_mentioning(str(out)) == [], procs.logs()


def _ca_context(out: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(out / "coordinator" / "ca" / "ca.crt"))

"""Tests for fedge.lab.control: ``fedge lab status`` and ``fedge lab down``, over a state folder under
tmp_path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge.lab import control
from fedge.lab.control import forget, format_status, lab_down, lab_status, write_run_info
from fedge.lab.host import LabError, LabState, TeardownReport, state_path, teardown


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``STATE_ROOT`` (not yet made) and ``state_path`` moved under tmp_path."""
    root = tmp_path / "fedge-lab"
    monkeypatch.setattr(control, "STATE_ROOT", root)
    monkeypatch.setattr(control, "state_path", lambda name: state_path(name, root=root))
    return root


def make_lab(root: Path, name: str, *, netns: int = 0) -> LabState:
    state = LabState.create(state_path(name, root=root), lab=name)
    for i in range(netns):
        state.add("netns", name=f"fedge-{name}-d{i}")
    return state


def write_run_json(root: Path, name: str, **info: object) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    base: dict[str, object] = {"out_dir": "/tmp/out", "spec": "ci.toml", "line": "round 1",
                               "updated_unix": 0.0}
    (root / name / "run.json").write_text(json.dumps({**base, **info}))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          check=True, text=True)
    return int(proc.stdout)


def start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


# ------------------------------------------------------------------ status


def test_no_lab_is_up_without_the_state_root(root: Path) -> None:
    assert lab_status() == []
    assert format_status(lab_status()) == "no lab is up"


def test_no_lab_is_up_with_an_empty_state_root(root: Path) -> None:
    root.mkdir()
    (root / "stray-file").write_text("not a lab")  # only folders are labs
    assert lab_status() == []


def test_a_lab_with_a_run_of_this_process_is_running(root: Path, tmp_path: Path) -> None:
    state = make_lab(root, "ci", netns=2)
    state.add("bridge", name="flcibr", address="10.213.0.1/24")
    write_run_info("ci", out_dir=tmp_path / "out", spec=tmp_path / "ci.toml", line="round 2 of 5: 3 of 4 in")
    [lab] = lab_status()
    assert lab["name"] == "ci" and lab["running"] is True
    assert lab["resources"] == {"netns": 2, "bridge": 1}
    assert lab["out_dir"] == str(tmp_path / "out") and lab["spec"] == str(tmp_path / "ci.toml")
    assert lab["progress"] == "round 2 of 5: 3 of 4 in"
    lines = format_status([lab]).splitlines()
    assert lines[0] == "ci: running; holds 1 bridge, 2 netns"
    assert lines[1].startswith("  round 2 of 5: 3 of 4 in (") and lines[1].endswith(" s ago)")
    assert lines[2] == f"  output: {tmp_path / 'out'}"


def test_write_run_info_records_this_process_and_replaces_the_line(root: Path, tmp_path: Path) -> None:
    write_run_info("ci", out_dir=tmp_path, spec=tmp_path / "s.toml", line="first")
    write_run_info("ci", out_dir=tmp_path, spec=tmp_path / "s.toml", line="second")
    info = json.loads((root / "ci" / "run.json").read_text())
    assert info["pid"] == os.getpid() and info["started"] == start_time(os.getpid())
    assert info["line"] == "second"
    assert [p.name for p in (root / "ci").iterdir()] == ["run.json"]  # no temporary file left


@pytest.mark.parametrize("info", [
    pytest.param({"pid": "dead", "started": "1"}, id="dead-pid"),
    pytest.param({"pid": "self", "started": "1"}, id="recycled-pid"),
    pytest.param({"pid": "self", "started": None}, id="no-start-time"),
    pytest.param({"pid": "42", "started": "1"}, id="pid-not-a-number"),
])
def test_a_run_that_is_gone_is_not_running(root: Path, info: dict[str, object]) -> None:
    pid = {"dead": dead_pid(), "self": os.getpid()}.get(str(info["pid"]), info["pid"])
    make_lab(root, "ci", netns=1)
    write_run_json(root, "ci", **{**info, "pid": pid})
    [lab] = lab_status()
    assert lab["running"] is False
    text = format_status([lab])
    assert text.splitlines()[0] == "ci: not running (run `fedge lab down` to clean up); holds 1 netns"
    assert "  output: /tmp/out" in text


def test_a_dead_run_with_its_real_start_time_is_not_running(root: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    started = start_time(proc.pid)
    proc.communicate(b"")
    make_lab(root, "ci")
    write_run_json(root, "ci", pid=proc.pid, started=started)
    assert lab_status()[0]["running"] is False


def test_a_folder_without_state_or_run_holds_nothing(root: Path) -> None:
    (root / "ci").mkdir(parents=True)
    [lab] = lab_status()
    assert lab == {"name": "ci", "running": False, "resources": {}, "out_dir": None, "spec": None,
                   "progress": None, "updated_unix": None}
    assert format_status([lab]) == "ci: not running (run `fedge lab down` to clean up); holds nothing"


def test_an_unreadable_run_json_is_no_run(root: Path) -> None:
    make_lab(root, "ci")
    (root / "ci" / "run.json").write_text("{not json")
    [lab] = lab_status()
    assert lab["running"] is False and lab["progress"] is None


def test_an_unreadable_state_file_is_shown_as_such(root: Path) -> None:
    (root / "ci").mkdir(parents=True)
    (root / "ci" / "state.json").write_text("[]")
    [lab] = lab_status()
    assert "error" in lab and "not a fedge lab state file" in lab["error"]
    assert format_status([lab]).startswith("ci: unreadable state: ")


def test_status_lists_labs_by_name(root: Path) -> None:
    for name in ("zz", "aa", "mm"):
        make_lab(root, name)
    assert [lab["name"] for lab in lab_status()] == ["aa", "mm", "zz"]
    assert len(format_status(lab_status()).splitlines()) == 3


def test_a_folder_that_cannot_be_a_lab_does_not_break_status_or_down(root: Path) -> None:
    make_lab(root, "ci")
    (root / "Not_A_Lab").mkdir()
    assert [lab["name"] for lab in lab_status()] == ["Not_A_Lab", "ci"]
    said: list[str] = []
    assert lab_down(None, progress=said.append) == []
    assert any("Not_A_Lab: not a lab's folder" in line for line in said)
    assert (root / "Not_A_Lab").is_dir() and not (root / "ci").exists()
    with pytest.raises(ConfigError, match="lab name"):
        lab_down("Not_A_Lab")


# ------------------------------------------------------------------ down


def test_down_of_a_lab_that_is_not_up_names_it(root: Path) -> None:
    with pytest.raises(LabError, match="no lab named 'nope' is up"):
        lab_down("nope")
    make_lab(root, "ci")
    with pytest.raises(LabError, match="'nope'"):
        lab_down("nope")
    assert (root / "ci").is_dir()


def test_down_of_a_lab_with_no_resources_removes_its_folder(root: Path) -> None:
    make_lab(root, "ci")
    write_run_json(root, "ci", pid=dead_pid(), started="1")
    (root / "ci" / "devices" / "pi-0").mkdir(parents=True)  # an empty mount point
    said: list[str] = []
    assert lab_down("ci", progress=said.append) == []
    assert not (root / "ci").exists()
    assert said == ["ci: removed 0 resources"]


def test_down_of_a_folder_without_a_state_file_removes_it(root: Path) -> None:
    (root / "ci").mkdir(parents=True)
    said: list[str] = []
    assert lab_down("ci", progress=said.append) == []
    assert not (root / "ci").exists() and said == []


def test_down_of_every_lab_with_none_up_says_so(root: Path) -> None:
    said: list[str] = []
    assert lab_down(None, progress=said.append) == []
    root.mkdir()
    assert lab_down(None, progress=said.append) == []
    assert said == ["no lab is up", "no lab is up"]


def test_down_of_every_lab_takes_each_down(root: Path) -> None:
    make_lab(root, "aa")
    make_lab(root, "bb")
    said: list[str] = []
    assert lab_down(None, progress=said.append) == []
    assert said == ["aa: removed 0 resources", "bb: removed 0 resources"]
    assert list(root.iterdir()) == []


def _failing_teardown(fail: str) -> Callable[[LabState], TeardownReport]:
    """The real teardown, except that lab ``fail``'s one resource cannot be removed."""
    def fake(state: LabState) -> TeardownReport:
        if state.lab != fail:
            return teardown(state)
        return TeardownReport(removed=(), already_gone=(), failures=("netns fedge-aa-d0: busy",),
                              state_deleted=False)
    return fake


def test_down_keeps_a_lab_whose_resources_stay_and_says_what(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    make_lab(root, "aa", netns=1)
    monkeypatch.setattr(control, "teardown", _failing_teardown("aa"))
    assert lab_down("aa") == ["aa: netns fedge-aa-d0: busy"]
    assert (root / "aa" / "state.json").exists()


def test_down_of_every_lab_forgets_the_ones_that_went(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_lab(root, "aa", netns=1)
    make_lab(root, "bb")
    monkeypatch.setattr(control, "teardown", _failing_teardown("aa"))
    assert lab_down(None) == ["aa: netns fedge-aa-d0: busy"]
    assert (root / "aa").is_dir()
    assert not (root / "bb").exists()


_RUN = """
import sys, time
from pathlib import Path
import fedge.lab.control as control
control.STATE_ROOT = Path(sys.argv[1])
control.write_run_info("ci", out_dir=Path(sys.argv[1]), spec=Path("ci.toml"), line="round 1 of 5")
print("ready", flush=True)
time.sleep(60)
"""


def test_down_stops_a_live_run_first(root: Path) -> None:
    make_lab(root, "ci")
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(root)], stdout=subprocess.PIPE, text=True)
    # Reap the run as soon as it ends, as its own parent would: a zombie keeps its pid and start time.
    reaper = threading.Thread(target=proc.wait, daemon=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert lab_status()[0]["running"] is True
        reaper.start()
        said: list[str] = []
        assert lab_down("ci", progress=said.append) == []
        reaper.join(10)
        assert proc.returncode == -signal.SIGTERM
        assert said == [f"ci: stopping its run (pid {proc.pid}), which tears down what it made",
                        "ci: removed 0 resources"]
        assert not (root / "ci").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


# ------------------------------------------------------------------ forget


def test_forget_removes_run_json_and_empty_folders_only(root: Path) -> None:
    folder = root / "ci"
    (folder / "devices" / "pi-0").mkdir(parents=True)
    (folder / "devices" / "x86-0").mkdir(parents=True)
    (folder / "devices" / "x86-0" / "agent.db").write_text("still mounted")
    write_run_json(root, "ci", pid=1, started="1")
    forget("ci")
    assert not (folder / "run.json").exists()
    assert not (folder / "devices" / "pi-0").exists()
    assert (folder / "devices" / "x86-0" / "agent.db").exists()


def test_forget_keeps_a_folder_that_still_has_its_state_file(root: Path) -> None:
    make_lab(root, "ci")
    forget("ci")
    assert (root / "ci" / "state.json").exists()


def test_forget_of_a_lab_that_is_gone_does_nothing(root: Path) -> None:
    forget("ci")
    assert not root.exists()

"""The lab's prerequisites: tools looked up on a PATH, kernel features tried for real (as root),
binfmt_misc entries read from a folder laid out like /proc/sys/fs/binfmt_misc, and the report."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge.lab.host import Completed, LabError
from fedge.lab.prereqs import BINFMT_HINT, Prereq, check, format_report, host_arch, require

AARCH64_MAGIC = "7f454c460201010000000000000000000200b700"
X86_64_MAGIC = "7f454c4602010100000000000000000002003e00"
FOREIGN = "arm64" if host_arch() == "amd64" else "amd64"
FOREIGN_MAGIC = AARCH64_MAGIC if FOREIGN == "arm64" else X86_64_MAGIC
QEMU = "aarch64" if FOREIGN == "arm64" else "x86_64"


def _binfmt(tmp_path: Path, *, mounted: bool = True, entry: str | None = None) -> Path:
    folder = tmp_path / "binfmt_misc"
    folder.mkdir()
    if mounted:
        (folder / "status").write_text("enabled\n")
        (folder / "register").write_text("")
    if entry is not None:
        (folder / f"qemu-{QEMU}").write_text(entry)
    return folder


def _entry(*, enabled: bool = True, flags: str = "PF", magic: str = FOREIGN_MAGIC) -> str:
    return (f"{'enabled' if enabled else 'disabled'}\ninterpreter /usr/libexec/qemu-binfmt/{QEMU}-binfmt-P\n"
            f"flags: {flags}\noffset 0\nmagic {magic}\nmask ffffffffffffff00fffffffffffffffffeffffff\n")


def _by_name(prereqs: list[Prereq]) -> dict[str, Prereq]:
    return {p.name: p for p in prereqs}


def test_tools_missing_from_path_are_listed_with_their_packages(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    found = _by_name(check(["amd64", "arm64"], path=str(empty), binfmt_dir=_binfmt(tmp_path, entry=_entry())))
    for name, package in [("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables"),
                          ("podman", "podman"), ("runc", "runc"), ("debootstrap", "debootstrap"),
                          ("tar", "tar"), ("mount", "util-linux"), ("sysctl", "procps")]:
        assert not found[name].ok and found[name].package == package, found[name]
        assert "not on PATH" in found[name].detail
    # Without the tools the kernel is not probed: said so, not passed.
    assert not found["tbf qdisc"].ok and "not tried" in found["tbf qdisc"].detail


def test_require_refuses_with_the_message_lab_check_prints(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    binfmt = _binfmt(tmp_path, mounted=False)
    with pytest.raises(LabError) as caught:
        require({"amd64", "arm64"}, path=str(empty), binfmt_dir=binfmt)
    message = str(caught.value)
    assert message == format_report(check({"amd64", "arm64"}, path=str(empty), binfmt_dir=binfmt))
    lines = message.splitlines()
    assert any(line.startswith("MISSING podman") and "(package podman)" in line for line in lines)
    install = next(line for line in lines if line.startswith("install: apt-get install "))
    for package in ("iproute2", "iptables", "podman", "runc", "debootstrap", "tar", "util-linux",
                    "binfmt-support", "qemu-user-static"):
        assert package in install.split()
    assert f"register emulation: {BINFMT_HINT.format(qemu=QEMU)}" in lines
    assert "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc" in message
    assert f"update-binfmts --enable qemu-{QEMU}" in message


@pytest.mark.parametrize(("mounted", "entry", "ok", "detail"), [
    (True, _entry(), True, "flags PF"),
    (True, _entry(flags="F"), True, "flags F"),
    (True, _entry(flags="P"), False, "lacks the F (fix binary) flag"),
    (True, _entry(flags=""), False, "lacks the F (fix binary) flag"),
    (True, _entry(enabled=False), False, "registered but disabled"),
    (True, _entry(magic="7f454c460101010000000000000000000200f300"), False, "no binfmt_misc entry"),
    (True, None, False, "no binfmt_misc entry"),
    (False, None, False, "not tried: binfmt_misc is not mounted"),
])
def test_a_foreign_architecture_needs_a_registered_qemu_with_the_f_flag(
        tmp_path: Path, mounted: bool, entry: str | None, ok: bool, detail: str) -> None:
    found = _by_name(check([FOREIGN], binfmt_dir=_binfmt(tmp_path, mounted=mounted, entry=entry)))
    handler = found[f"qemu-{QEMU} handler"]
    assert handler.ok is ok and detail in handler.detail, handler
    assert handler.package == "qemu-user-static"
    assert found["binfmt_misc"].ok is mounted and found["binfmt_misc"].package == "binfmt-support"
    report = format_report(found.values())
    assert (f"update-binfmts --enable qemu-{QEMU}" in report) is not ok


def test_the_host_architecture_alone_needs_no_emulation(tmp_path: Path) -> None:
    names = _by_name(check([host_arch()], binfmt_dir=_binfmt(tmp_path, mounted=False)))
    assert "binfmt_misc" not in names and not any(n.startswith("qemu-") for n in names)


@pytest.mark.parametrize("arches", [["riscv64"], ["amd64", "x86_64"], [], ["ARM64"]])
def test_unknown_architectures_are_refused(arches: list[str]) -> None:
    with pytest.raises(ConfigError, match="architectures"):
        check(arches)
    with pytest.raises(ConfigError, match="architectures"):
        require(arches)


def test_root_is_reported_for_what_it_is() -> None:
    root = _by_name(check(["amd64"]))["root"]
    assert root.ok is (os.geteuid() == 0)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the kernel probes (a throwaway network namespace and tmpfs) need root")


def test_this_host_passes_the_kernel_probes_and_they_leave_nothing() -> None:
    _need_root()
    found = _by_name(check([host_arch()]))
    for name in ("network namespaces", "veth and bridge links", "tbf qdisc", "iptables statistic match",
                 "tmpfs mount"):
        assert found[name].ok, found[name]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"fedge-check{os.getpid()}" not in namespaces
    assert "fedge-check-" not in Path("/proc/self/mountinfo").read_text()


class _NoTbf:
    """A real runner, except that the kernel has no tbf qdisc."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Completed:
        self.calls.append(tuple(argv))
        if "tbf" in argv:
            return Completed(tuple(argv), 2, "", "Error: Specified qdisc kind is unknown.\n")
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        return Completed(tuple(argv), done.returncode, done.stdout, done.stderr)


def test_a_missing_kernel_feature_is_reported_and_the_probe_namespace_still_goes() -> None:
    _need_root()
    run = _NoTbf()
    found = _by_name(check([host_arch()], run=run))
    assert not found["tbf qdisc"].ok
    assert found["tbf qdisc"].detail == "Error: Specified qdisc kind is unknown."
    assert found["iptables statistic match"].ok and found["network namespaces"].ok
    assert run.calls[-3][:3] == ("ip", "netns", "del")  # then the tmpfs probe: mount, umount
    report = format_report(found.values()).splitlines()
    assert any(line.startswith("MISSING tbf qdisc") for line in report)
    assert report[-1].startswith("fedge lab: 1 of ")  # the kernel's tbf has no package to install


def test_a_complete_report_says_so() -> None:
    report = format_report([Prereq("ip", True, "/usr/sbin/ip", "iproute2"),
                            Prereq("root", True, "root", None)])
    assert report.splitlines() == ["ok      ip    /usr/sbin/ip", "ok      root  root",
                                   "fedge lab: every prerequisite is present"]
    short = format_report([Prereq("root", False, "not root (namespaces and mounts need it)", None)])
    assert "fedge lab: 1 of 1 prerequisites missing" in short and "run it as root" in short
    assert "apt-get" not in short

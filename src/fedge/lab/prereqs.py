"""What ``fedge lab`` needs on the host, checked for real, and the message that lists what is missing.

:func:`check` looks for the tools on PATH and tries the kernel features in a
throwaway network namespace (a veth pair, a bridge, a tbf qdisc, an iptables
``statistic`` rule) and a throwaway tmpfs, so a lab never half-starts on a
host that cannot finish it: :func:`require` raises, before anything is made,
with the same text ``fedge lab check`` prints. Emulating a foreign
architecture (arm64 devices on an x86 host) also needs binfmt_misc with a
qemu handler registered with the F (fix binary) flag, so that containers
run foreign binaries without qemu inside them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import ConfigError
from fedge.lab.host import Completed, LabError, Runner, run_command

__all__ = ["ARCHES", "BINFMT_HINT", "Prereq", "check", "format_report", "host_arch", "require"]

#: The device architectures a lab can run.
ARCHES = ("amd64", "arm64")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_HINT = ("mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
               "update-binfmts --enable qemu-{qemu}")
# ELF header of a little-endian 64-bit executable of each machine, as binfmt_misc shows its magic.
_ELF_MAGIC = {
    "arm64": ("aarch64", "7f454c460201010000000000000000000200b700"),
    "amd64": ("x86_64", "7f454c4602010100000000000000000002003e00"),
}
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_TOOLS = (  # (what, programs, Debian package)
    ("ip", ("ip",), "iproute2"),
    ("tc", ("tc",), "iproute2"),
    ("iptables", ("iptables",), "iptables"),
    ("sysctl", ("sysctl",), "procps"),
    ("mount", ("mount", "umount", "findmnt"), "util-linux"),
    ("podman", ("podman",), "podman"),
    ("runc", ("runc",), "runc"),
    ("debootstrap", ("debootstrap",), "debootstrap"),
    ("tar", ("tar",), "tar"),
)


@dataclass(frozen=True)
class Prereq:
    """One thing the lab needs: whether it is there, what was found or went wrong, its Debian package."""

    name: str
    ok: bool
    detail: str
    package: str | None


def _arches(arches: Iterable[str]) -> list[str]:
    wanted = sorted(set(arches))
    unknown = [a for a in wanted if a not in ARCHES]
    if unknown or not wanted:
        raise ConfigError(f"architectures {unknown or wanted!r} are not among {', '.join(ARCHES)}")
    return wanted


def host_arch() -> str:
    """This machine's architecture in Debian's words (``amd64``, ``arm64``)."""
    return _MACHINES.get(platform.machine().lower(), platform.machine().lower())


def check(arches: Iterable[str] = ARCHES, *, path: str | None = None, binfmt_dir: Path = BINFMT_DIR,
          run: Runner = run_command) -> list[Prereq]:
    """Check what a lab with devices of ``arches`` needs on this host.

    Args:
        arches: the device architectures the lab will run.
        path: the PATH to look for tools on (default: this process's).
        binfmt_dir: where binfmt_misc is mounted.
        run: how probe commands run.

    Raises:
        ConfigError: an architecture is not one of :data:`ARCHES`.
    """
    wanted = _arches(arches)
    root = os.geteuid() == 0
    found = [
        Prereq("root", root, "running as root" if root else "not root (namespaces and mounts need it)", None),
        Prereq("linux", sys.platform.startswith("linux"), f"platform {sys.platform}", None),
    ]
    for what, programs, package in _TOOLS:
        where = [shutil.which(p, path=path) for p in programs]
        missing = [p for p, w in zip(programs, where, strict=True) if w is None]
        detail = f"{', '.join(missing)} not on PATH" if missing else ", ".join(str(w) for w in where)
        found.append(Prereq(what, not missing, detail, package))
    tools = {p.name for p in found if p.ok}
    found += _kernel(run, root=root, tools=tools)
    for arch in wanted:
        if arch != host_arch():
            found += _binfmt(arch, binfmt_dir)
    return found


def _kernel(run: Runner, *, root: bool, tools: set[str]) -> list[Prereq]:
    """Try each kernel feature the lab uses, inside a namespace made and deleted here."""
    names = ("network namespaces", "veth and bridge links", "tbf qdisc", "iptables statistic match",
             "tmpfs mount")
    packages: dict[str, str | None] = {"iptables statistic match": "iptables"}
    if not root or not {"ip", "tc", "iptables", "mount"} <= tools:
        why = "not tried: needs root" if not root else "not tried: ip, tc, iptables or mount is missing"
        return [Prereq(n, False, why, packages.get(n)) for n in names]
    ns = f"fedge-check{os.getpid()}"
    probes = {
        names[1]: [["ip", "-n", ns, "link", "add", "c0", "type", "veth", "peer", "name", "c1"],
                   ["ip", "-n", ns, "link", "add", "cbr", "type", "bridge"]],
        names[2]: [["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf",
                    "rate", "1mbit", "burst", "32kbit", "latency", "400ms"]],
        names[3]: [["ip", "netns", "exec", ns, "iptables", "-w", "-A", "OUTPUT", "-m", "statistic",
                    "--mode", "random", "--probability", "0.5", "-j", "DROP"]],
    }
    results: list[Prereq] = []
    made = run(["ip", "netns", "add", ns])
    results.append(Prereq(names[0], made.returncode == 0, _said(made, "ip netns add works"), None))
    try:
        for name, commands in probes.items():
            if made.returncode != 0:
                results.append(Prereq(name, False, "not tried: no network namespace", packages.get(name)))
                continue
            done = made
            for argv in commands:
                done = run(argv)
                if done.returncode != 0:
                    break
            results.append(Prereq(name, done.returncode == 0, _said(done, "works"), packages.get(name)))
    finally:
        if made.returncode == 0:
            run(["ip", "netns", "del", ns])
    results.append(_tmpfs(run))
    return results


def _tmpfs(run: Runner) -> Prereq:
    folder = tempfile.mkdtemp(prefix="fedge-check-")
    try:
        done = run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", folder])
        if done.returncode == 0:
            run(["umount", folder])
        return Prereq("tmpfs mount", done.returncode == 0, _said(done, "mount -t tmpfs works"), None)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _said(done: Completed, ok_text: str) -> str:
    if done.returncode == 0:
        return ok_text
    return " ".join(done.stderr.split())[:200] or f"exit {done.returncode}"


def _binfmt(arch: str, binfmt_dir: Path) -> list[Prereq]:
    qemu, magic = _ELF_MAGIC[arch]
    mounted = (binfmt_dir / "status").exists()
    found = [Prereq("binfmt_misc", mounted, f"mounted at {binfmt_dir}" if mounted
                    else f"not mounted at {binfmt_dir}", "binfmt-support")]
    handler = f"qemu-{qemu} handler"
    if not mounted:
        return [*found, Prereq(handler, False, "not tried: binfmt_misc is not mounted", "qemu-user-static")]
    for entry in sorted(binfmt_dir.iterdir()):
        if entry.name in ("status", "register"):
            continue
        with contextlib.suppress(OSError):
            lines = entry.read_text().splitlines()
            # Lines read "interpreter PATH", "flags: PF", "offset 0", "magic HEX".
            fields = {k.rstrip(":"): v.strip() for k, _, v in (line.partition(" ") for line in lines)}
            if fields.get("magic") != magic:
                continue
            if "enabled" not in lines:
                return [*found, Prereq(handler, False, f"{entry.name} is registered but disabled",
                                       "qemu-user-static")]
            if "F" not in fields.get("flags", ""):
                return [*found, Prereq(handler, False, f"{entry.name} lacks the F (fix binary) flag, so "
                                       "containers cannot use it", "qemu-user-static")]
            return [*found, Prereq(handler, True, f"{entry.name}: {fields.get('interpreter', '?')} "
                                   f"(flags {fields.get('flags', '')})", "qemu-user-static")]
    return [*found, Prereq(handler, False, f"no binfmt_misc entry for {qemu} ELF binaries",
                           "qemu-user-static")]


def format_report(prereqs: Iterable[Prereq]) -> str:
    """The table ``fedge lab check`` prints: one line per prerequisite, then how to get what is missing."""
    items = list(prereqs)
    width = max([len(p.name) for p in items] + [4])
    lines = [f"{'ok' if p.ok else 'MISSING':<8}{p.name:<{width + 2}}{p.detail}"
             + ("" if p.ok or p.package is None else f"  (package {p.package})") for p in items]
    missing = [p for p in items if not p.ok]
    if not missing:
        return "\n".join([*lines, "fedge lab: every prerequisite is present"])
    packages = sorted({p.package for p in missing if p.package is not None})
    lines.append(f"fedge lab: {len(missing)} of {len(items)} prerequisites missing")
    if packages:
        lines.append(f"install: apt-get install {' '.join(packages)}")
    for p in missing:
        if p.name == "root":
            lines.append("run it as root (sudo fedge lab ...)")
        elif p.name.startswith("qemu-"):  # also missing when binfmt_misc is
            lines.append(f"register emulation: {BINFMT_HINT.format(qemu=p.name.split()[0][5:])}")
    return "\n".join(lines)


def require(arches: Iterable[str] = ARCHES, *, path: str | None = None,
            binfmt_dir: Path = BINFMT_DIR) -> list[Prereq]:
    """Check the prerequisites; if one is missing, raise :class:`LabError` with the report's text."""
    found = check(arches, path=path, binfmt_dir=binfmt_dir)
    if not all(p.ok for p in found):
        raise LabError(format_report(found))
    return found

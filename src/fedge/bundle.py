"""Offline install bundles: fedge's wheel and every dependency, for air-gapped devices.

``build_bundle`` writes, into one folder::

    wheels/                      fedge's wheel and every dependency's wheel
    requirements-ARCH.txt        exact pins with SHA-256 hashes, one file per architecture
    install.sh                   makes a venv and installs from wheels/ with --no-index
    bundle.json                  what is inside: version, extras, Python, platforms, files, hashes

A device then installs with no network at all::

    sh install.sh --prefix /opt/fedge          # pip install --no-index --require-hashes ...

Wheels are fetched with ``pip download --only-binary=:all: --platform P`` for
each target platform, so a bundle for arm64 devices is built on an x86
machine. Hashes pin every file: a wheel swapped in the folder fails the install.
This module runs pip as a subprocess (its documented interface) and never
imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedge import __version__
from fedge.errors import ConfigError, FedgeError

__all__ = ["ARCHES", "BundleError", "BundleManifest", "build_bundle", "default_platform", "find_source"]

# Architectures a bundle can target, as ``uname -m`` names them on Linux.
ARCHES = ("x86_64", "aarch64", "armv7l")
EXTRAS = ("agent", "coordinator", "sim", "torch", "ray")
_PLATFORM = re.compile(r"(manylinux\d*|manylinux_\d+_\d+|musllinux_\d+_\d+|linux)_(x86_64|aarch64|armv7l)")
_PYTHON = re.compile(r"3\.(\d{1,2})")
_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-.+\.whl$")
# Wheels are tens of MB at most; a download that takes longer is stuck.
_PIP_TIMEOUT_S = 1800


class BundleError(FedgeError):
    """Building the bundle failed (pip could not build or fetch a wheel)."""


@dataclass(frozen=True)
class BundleManifest:
    """What ``bundle.json`` records."""

    out_dir: Path
    fedge_version: str
    extras: tuple[str, ...]
    python: str
    platforms: tuple[str, ...]
    files: dict[str, str]  # wheel file name -> sha256
    requirements: dict[str, list[str]]  # arch -> wheel file names installed on it

    def to_json(self) -> dict[str, object]:
        return {
            "fedge_version": self.fedge_version,
            "extras": list(self.extras),
            "python": self.python,
            "platforms": list(self.platforms),
            "files": dict(sorted(self.files.items())),
            "requirements": {k: sorted(v) for k, v in sorted(self.requirements.items())},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def default_platform() -> str:
    """This machine's manylinux platform tag (``manylinux2014_x86_64`` on x86_64)."""
    machine = os.uname().machine
    if machine not in ARCHES:
        raise ConfigError(f"this machine's architecture {machine!r} is not one fedge bundles for "
                          f"({', '.join(ARCHES)}); pass --platform")
    return f"manylinux2014_{machine}"


def find_source() -> Path:
    """The source checkout this fedge runs from (the folder holding ``pyproject.toml``).

    Raises:
        ConfigError: fedge runs from an installed wheel, not a checkout.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "src" / "fedge").is_dir():
        return root
    raise ConfigError("this fedge is installed from a wheel, not run from a source checkout; "
                      "pass --source DIR (a fedge checkout) or --wheel FILE (fedge's wheel)")


def _check(platforms: Sequence[str], python: str, extras: Sequence[str]) -> None:
    if not platforms:
        raise ConfigError("--platform: give at least one target platform")
    for p in platforms:
        if not _PLATFORM.fullmatch(p):
            raise ConfigError(
                f"--platform {p!r} is not a Linux wheel platform tag; examples: "
                "manylinux2014_x86_64, manylinux_2_17_aarch64, musllinux_1_1_aarch64"
            )
    if not _PYTHON.fullmatch(python) or int(python.split(".")[1]) < 11:
        raise ConfigError(f"--python must be a version like 3.11 (3.11 or later), got {python!r}")
    for e in extras:
        if e not in EXTRAS:
            raise ConfigError(f"--extras: unknown extra {e!r}; known: {', '.join(EXTRAS)}")


def _arch(platform: str) -> str:
    m = _PLATFORM.fullmatch(platform)
    assert m is not None  # checked by _check
    return m.group(2)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip(args: Sequence[str], *, what: str) -> str:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{what}: pip ran for more than {_PIP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()][-3:]
        raise BundleError(f"{what} failed: " + " | ".join(tail))
    return done.stdout


def _project_name(wheel: str) -> str:
    m = _WHEEL.match(wheel)
    if m is None:
        raise BundleError(f"pip produced a file that is not a wheel: {wheel}")
    return m.group("name").replace("_", "-").replace(".", "-").lower()


def _version(wheel: str) -> str:
    m = _WHEEL.match(wheel)
    assert m is not None
    return m.group("version")


def build_bundle(
    out_dir: Path,
    *,
    platforms: Sequence[str] | None = None,
    python: str = "3.11",
    extras: Sequence[str] = ("agent",),
    source: Path | None = None,
    wheel: Path | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> BundleManifest:
    """Write an offline install bundle for ``platforms`` into ``out_dir``.

    Args:
        out_dir: the bundle folder; created, and must be empty if it exists.
        platforms: wheel platform tags (default: this machine's).
        python: the devices' Python version (``3.11``).
        extras: fedge extras to install (``agent`` for devices).
        source: a fedge checkout to build the wheel from (default: this one).
        wheel: fedge's wheel, already built (instead of ``source``).
        progress: called with one line per step.

    Raises:
        ConfigError: a bad platform, Python version or extra, or a non-empty ``out_dir``.
        BundleError: pip failed (no network, no wheel for a platform).
    """
    platforms = tuple(platforms or (default_platform(),))
    extras = tuple(dict.fromkeys(extras))
    _check(platforms, python, extras)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} exists and is not an empty folder")
    if wheel is not None and not (wheel.is_file() and wheel.name.startswith("fedge-")
                                  and wheel.suffix == ".whl"):
        raise ConfigError(f"--wheel {wheel} is not a fedge wheel file")
    wheels = out_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedge-bundle-") as tmp:
        if wheel is None:
            src = source or find_source()
            progress(f"building fedge's wheel from {src}")
            _pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", tmp, str(src)],
                 what="building fedge's wheel")
            built = sorted(Path(tmp).glob("fedge-*.whl"))
            if len(built) != 1:
                raise BundleError(f"building fedge's wheel left {len(built)} fedge wheels")
            wheel = built[0]
        own = wheels / wheel.name
        shutil.copy2(wheel, own)
        requirement = f"{own}[{','.join(extras)}]" if extras else str(own)
        per_arch: dict[str, set[str]] = {}
        for platform in platforms:
            progress(f"fetching wheels for {platform}, Python {python}")
            dest = Path(tmp) / platform
            _pip(["download", "--quiet", "--only-binary=:all:", "--platform", platform,
                  "--python-version", python, "--implementation", "cp", "--dest", str(dest), requirement],
                 what=f"fetching wheels for {platform}")
            names = {p.name for p in dest.iterdir() if p.suffix == ".whl"}
            for name in names:
                if not (wheels / name).exists():
                    shutil.move(str(dest / name), wheels / name)
            per_arch.setdefault(_arch(platform), set()).update(names | {own.name})
    files = {p.name: _sha256(p) for p in sorted(wheels.iterdir())}
    for arch, names in per_arch.items():
        _write_requirements(out_dir / f"requirements-{arch}.txt", sorted(names), files)
    install = out_dir / "install.sh"
    install.write_text(_INSTALL_SH.replace("@PYTHON@", python).replace("@VERSION@", __version__))
    install.chmod(0o755)
    manifest = BundleManifest(
        out_dir=out_dir, fedge_version=_version(own.name), extras=extras, python=python,
        platforms=platforms, files=files, requirements={a: sorted(n) for a, n in per_arch.items()},
    )
    (out_dir / "bundle.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    size = sum((wheels / n).stat().st_size for n in files)
    progress(f"{len(files)} wheels, {size / 1e6:.1f} MB, for {', '.join(sorted(per_arch))}")
    return manifest


def _write_requirements(path: Path, names: Sequence[str], files: dict[str, str]) -> None:
    """Exact pins with every matching file's hash, for ``pip install --require-hashes``."""
    by_project: dict[tuple[str, str], list[str]] = {}
    for name in names:
        by_project.setdefault((_project_name(name), _version(name)), []).append(files[name])
    lines = ["# Generated by `fedge bundle`: every package pinned, every file hashed."]
    for (project, version), hashes in sorted(by_project.items()):
        pins = " ".join(f"--hash=sha256:{h}" for h in sorted(set(hashes)))
        lines.append(f"{project}=={version} {pins}")
    path.write_text("\n".join(lines) + "\n")


_INSTALL_SH = r"""#!/bin/sh
# Install fedge @VERSION@ from this offline bundle: no network is used.
#
#   sh install.sh [--prefix DIR] [--python PYTHON]
#
# --prefix  the virtual environment to create or update (default /opt/fedge)
# --python  the Python @PYTHON@ interpreter to build it with (default python3)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prefix=/opt/fedge
python=python3
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

arch=$(uname -m)
requirements="$here/requirements-$arch.txt"
if [ ! -f "$requirements" ]; then
    have=""
    for f in "$here"/requirements-*.txt; do
        f=${f##*/requirements-}
        have="$have ${f%.txt}"
    done
    echo "install.sh: this bundle has no wheels for $arch; it has:$have" >&2
    exit 2
fi
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    echo "install.sh: $python is not a working Python interpreter" >&2
    exit 2
}
if [ "$have" != "@PYTHON@" ]; then
    echo "install.sh: this bundle is for Python @PYTHON@; $python is Python $have" >&2
    exit 2
fi
if [ ! -x "$prefix/bin/python" ]; then
    "$python" -m venv "$prefix"
fi
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$here/wheels" --require-hashes -r "$requirements"
echo "install.sh: fedge @VERSION@ installed in $prefix ($prefix/bin/fedge)"
"""

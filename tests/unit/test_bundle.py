"""``fedge bundle``'s checks, its hashed requirements, and the install script's refusals."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.bundle import _INSTALL_SH, _write_requirements, build_bundle, default_platform
from fedge.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"platforms": ["win_amd64"]}, "not a Linux wheel platform tag"),
        ({"platforms": ["manylinux2014_riscv64"]}, "not a Linux wheel platform tag"),
        ({"python": "2.7"}, "--python must be"),
        ({"python": "3.10"}, "--python must be"),
        ({"python": "three"}, "--python must be"),
        ({"extras": ["agent", "gpu"]}, "unknown extra 'gpu'"),
        ({"wheel": Path("/nonexistent/fedge-0.1.0-py3-none-any.whl")}, "is not a fedge wheel"),
    ],
)
def test_bad_arguments_are_refused_before_any_download(tmp_path: Path, kwargs: dict[str, object],
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_bundle(tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "wheels").exists() or not any((tmp_path / "out" / "wheels").iterdir())


def test_the_default_platform_is_this_machines() -> None:
    assert default_platform() == f"manylinux2014_{os.uname().machine}"


def test_a_non_empty_out_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        build_bundle(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_requirements_pin_every_file_with_its_hash(tmp_path: Path) -> None:
    names = ["numpy-2.2.6-cp311-cp311-manylinux2014_x86_64.whl",
             "numpy-2.2.6-cp311-cp311-manylinux2014_aarch64.whl",
             "typing_extensions-4.16.0-py3-none-any.whl"]
    files = {n: hashlib.sha256(n.encode()).hexdigest() for n in names}
    out = tmp_path / "requirements.txt"
    _write_requirements(out, names, files)
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert lines[0].startswith("numpy==2.2.6 ")
    assert lines[0].count("--hash=sha256:") == 2
    assert lines[1] == f"typing-extensions==4.16.0 --hash=sha256:{files[names[2]]}"


def _install_sh(tmp_path: Path, arches: list[str]) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    for arch in arches:
        (bundle / f"requirements-{arch}.txt").write_text("")
    script = bundle / "install.sh"
    script.write_text(_INSTALL_SH.replace("@PYTHON@", "3.11").replace("@VERSION@", "0.0.0"))
    return script


def _sh(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, timeout=60, check=False)


def test_install_script_refuses_a_bundle_for_another_architecture(tmp_path: Path) -> None:
    other = "aarch64" if os.uname().machine != "aarch64" else "x86_64"
    result = _sh(_install_sh(tmp_path, [other]), "--prefix", str(tmp_path / "venv"))
    assert result.returncode == 2
    assert f"no wheels for {os.uname().machine}; it has: {other}" in result.stderr


def test_install_script_refuses_another_python(tmp_path: Path) -> None:
    fake = tmp_path / "python-3.9"
    fake.write_text('#!/bin/sh\necho 3.9\n')
    fake.chmod(0o755)
    result = _sh(_install_sh(tmp_path, [os.uname().machine]), "--python", str(fake))
    assert result.returncode == 2 and "this bundle is for Python 3.11" in result.stderr


def test_install_script_refuses_a_missing_python_and_unknown_arguments(tmp_path: Path) -> None:
    script = _install_sh(tmp_path, [os.uname().machine])
    result = _sh(script, "--python", str(tmp_path / "no-such-python"))
    assert result.returncode == 2 and "is not a working Python interpreter" in result.stderr
    result = _sh(script, "--frobnicate")
    assert result.returncode == 2 and "unknown argument: --frobnicate" in result.stderr


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from fedge.cli import main; sys.exit(main())", "bundle",
         "--out", str(tmp_path / "b"), "--platform", "win32"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("fedge: error: --platform 'win32' is not a Linux wheel platform tag")

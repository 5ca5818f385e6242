"""A real offline bundle: built from this checkout (wheels fetched from the package index for two
architectures), installed into a fresh venv with no index at all, and refused once tampered with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.bundle import build_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "agent"
    lines: list[str] = []
    build_bundle(out, platforms=["manylinux2014_x86_64", "manylinux_2_17_aarch64"], extras=["agent"],
                 progress=lines.append)
    assert any("fetching wheels for manylinux_2_17_aarch64" in ln for ln in lines)
    return out


def _env() -> dict[str, str]:
    # No index, no PYTHONPATH: the install must come from the bundle alone.
    drop = {"PYTHONPATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_NO_INDEX"] = "1"
    return env


def test_bundle_holds_both_architectures_and_a_manifest(bundle: Path) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["extras"] == ["agent"] and manifest["python"] == "3.11"
    assert set(manifest["requirements"]) == {"x86_64", "aarch64"}
    wheels = {p.name for p in (bundle / "wheels").iterdir()}
    assert set(manifest["files"]) == wheels
    assert any("aarch64" in w and w.startswith("numpy-") for w in wheels)
    assert any("x86_64" in w and w.startswith("cryptography-") for w in wheels)
    assert not any(w.startswith(("torch-", "fastapi-", "matplotlib-")) for w in wheels)


@pytest.mark.skipif(os.uname().machine not in {"x86_64", "aarch64"}, reason="bundle built for x86_64/aarch64")
def test_bundle_installs_offline_and_the_agent_runs(bundle: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["sh", str(bundle / "install.sh"), "--prefix", str(venv), "--python", sys.executable],
        capture_output=True, text=True, env=_env(), timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    help_text = subprocess.run([str(venv / "bin" / "fedge"), "agent", "--help"], capture_output=True,
                               text=True, env=_env(), timeout=60, check=False)
    assert help_text.returncode == 0 and "--coordinator" in help_text.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import fedge; print(fedge.__file__)"],
                           capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60, check=True)
    assert Path(where.stdout.strip()).is_relative_to(venv)


def test_a_tampered_wheel_fails_the_install(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    (wheel,) = [p for p in (copy / "wheels").iterdir() if p.name.startswith("fedge-")]
    data = bytearray(wheel.read_bytes())
    data[-100] ^= 0xFF
    wheel.write_bytes(bytes(data))
    result = subprocess.run(
        ["sh", str(copy / "install.sh"), "--prefix", str(tmp_path / "venv"), "--python", sys.executable],
        capture_output=True, text=True, env=_env(), timeout=600, check=False,
    )
    assert result.returncode != 0
    assert "hash" in result.stderr.lower()

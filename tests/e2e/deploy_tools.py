"""The deployment tools the deploy tests run, and what to do when one is missing.

CI installs every one of them (``.ci/run`` takes the Debian packages, the dev
extra the PyPI ones), so there a missing tool fails the test; elsewhere it
skips with the package to install.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str, package: str) -> str:
    """The path of ``name`` (the venv's bin first, then PATH); fail in CI, skip elsewhere if absent."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if found:
        return str(found)
    message = f"{name} is not installed (it comes with {package}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"{why} needs root")
        pytest.skip(f"{why} needs root")

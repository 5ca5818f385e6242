"""The agent images the lab runs: built once from the real offline bundle, then cached in Podman.

A lab device runs ``fedge agent`` exactly as a real device would after
``sh install.sh`` from ``fedge bundle --platform ...``: the image is the
deployment issue's own ``agent`` target (``deploy/container/Containerfile``)
built over a Debian bookworm base made with ``debootstrap`` for the device's
architecture (``deploy/podman/build-base.sh``). An arm64 image is built and
run through qemu-user-static, which binfmt_misc invokes for every aarch64
binary, so its Python really is aarch64 code, emulated.

Images are tagged ``localhost/fedge-lab-agent:KEY-ARCH``, where ``KEY`` is a
digest of the fedge source tree and the Containerfile: a lab run after a code
change rebuilds, a run with nothing changed reuses the image (minutes saved
per arm64 image). Older lab images of the same architecture are removed once
a new one is built, so the cache holds one image per architecture.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fedge.bundle import build_bundle, find_source
from fedge.errors import ConfigError
from fedge.lab.host import LabError
from fedge.lab.prereqs import host_arch

__all__ = ["IMAGE_REPO", "agent_image", "deploy_dir", "ensure_agent_image", "podman_env", "source_key"]

logger = logging.getLogger(__name__)

IMAGE_REPO = "localhost/fedge-lab-agent"
_PLATFORMS = {"amd64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
# An emulated arm64 build installs numpy and cryptography under qemu: minutes, not hours.
_BUILD_TIMEOUT_S = 3600


def deploy_dir() -> Path:
    """The checkout's ``deploy/`` folder (Containerfile, base-image script, Podman settings).

    Raises:
        ConfigError: fedge runs from a wheel, so the deployment files are not at hand.
    """
    return find_source() / "deploy"


def podman_env() -> dict[str, str]:
    """The environment for ``podman``: this repository's settings for hosts like ours (cgroupfs, runc)."""
    env = dict(os.environ)
    conf = deploy_dir() / "podman" / "containers.conf"
    if conf.is_file() and "CONTAINERS_CONF" not in env:
        env["CONTAINERS_CONF"] = str(conf)
    return env


def source_key(root: Path | None = None) -> str:
    """12 hex digits naming the fedge source (``src/fedge``, ``pyproject.toml``) and the Containerfile.

    ``src/fedge/lab`` is left out: the lab's own code runs on the host, never in a device's image,
    so changing it need not rebuild an emulated image.
    """
    root = root or find_source()
    digest = hashlib.sha256()
    files = [root / "pyproject.toml", root / "deploy" / "container" / "Containerfile"]
    files += sorted(p for p in (root / "src" / "fedge").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                    and p.relative_to(root / "src" / "fedge").parts[0] != "lab")
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def agent_image(arch: str, key: str) -> str:
    """The tag of the lab's agent image for ``arch`` built from source ``key``."""
    if arch not in _PLATFORMS:
        raise ConfigError(f"unknown architecture {arch!r}; the lab runs {', '.join(_PLATFORMS)}")
    return f"{IMAGE_REPO}:{key}-{arch}"


def _run(args: list[str], *, what: str, timeout_s: float = _BUILD_TIMEOUT_S) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=podman_env(), timeout=timeout_s,
                              check=False)
    except FileNotFoundError as e:
        raise LabError(f"{what}: {args[0]} is not installed (run `fedge lab check`)") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{what}: still running after {timeout_s:.0f} s") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise LabError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=podman_env(), capture_output=True,
                          check=False).returncode == 0


def ensure_agent_image(arch: str, *, progress: Callable[[str], None] = lambda _m: None) -> str:
    """The agent image for ``arch``, built now if this source has none yet.

    Args:
        arch: ``amd64`` or ``arm64``.
        progress: told each step (base image, bundle, build); a cached image says so.

    Returns:
        The image's tag.

    Raises:
        ConfigError: an unknown architecture, or no source checkout.
        LabError: a build step failed (its output's tail is in the message).
        BundleError: the wheels could not be fetched.
    """
    root = find_source()
    image = agent_image(arch, source_key(root))
    if _exists(image):
        progress(f"{arch}: agent image {image} (cached)")
        return image
    deploy = root / "deploy"
    base = f"localhost/fedge-base:bookworm-{arch}"
    if not _exists(base):
        progress(f"{arch}: building the Debian bookworm base image with debootstrap (once; minutes)")
        _run(["bash", str(deploy / "podman" / "build-base.sh"), "--arch", arch, "--image", base],
             what=f"building {base}")
    with tempfile.TemporaryDirectory(prefix="fedge-lab-context-", dir="/var/tmp") as tmp:
        context = Path(tmp)
        progress(f"{arch}: writing the agent's offline bundle ({_PLATFORMS[arch]})")
        build_bundle(context / "bundles" / "agent", platforms=[_PLATFORMS[arch]], extras=["agent"],
                     source=root, progress=lambda m: logger.debug("bundle: %s", m))
        # The Containerfile's coordinator stages copy bundles/coordinator; the agent target does not
        # need it, but the build context must hold the folder for the COPY to resolve.
        (context / "bundles" / "coordinator").mkdir()
        progress(f"{arch}: building {image} from the bundle"
                 + (" (emulated: several minutes)" if arch != host_arch() else ""))
        _run(["podman", "build", "--format", "docker", "--arch", arch, "--build-arg", f"BASE={base}",
              "--target", "agent", "-f", str(deploy / "container" / "Containerfile"), "-t", image,
              str(context)], what=f"building {image}")
    _remove_older(arch, keep=image)
    return image


def _remove_older(arch: str, *, keep: str) -> None:
    listed = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPO],
                            capture_output=True, text=True, env=podman_env(), check=False).stdout
    stale = [t for t in _tags(listed.split()) if t.endswith(f"-{arch}") and t != keep]
    if stale:
        subprocess.run(["podman", "rmi", "-f", *stale], capture_output=True, env=podman_env(), check=False)


def _tags(lines: Iterable[str]) -> list[str]:
    return [t for t in lines if t.startswith(f"{IMAGE_REPO}:")]

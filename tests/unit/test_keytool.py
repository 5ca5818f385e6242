"""The agent's keytool: the key and certificate chores it runs in a child process."""

from __future__ import annotations

import datetime as dt
import json
import socket
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509

from fedge import pki
from fedge.agent import keytool


def test_csr_makes_the_key_once_with_mode_0600(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "device.key"
    assert keytool.main(["csr", "--key", str(key), "--device-id", "gw-1"]) == 0
    first = capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    csr = x509.load_pem_x509_csr(first.encode())
    assert csr.is_signature_valid
    before = key.read_bytes()
    assert keytool.main(["csr", "--key", str(key), "--device-id", "gw-1"]) == 0
    assert key.read_bytes() == before  # the key is kept, never replaced
    assert "PRIVATE KEY" not in capsys.readouterr().out


def test_inspect_reports_the_id_and_validity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = pki.create_ca(now=now)
    key = pki.new_device_key()
    cert = pki.sign_device_csr(ca, pki.make_csr(key, "gw-1"), device_id="gw-1", valid_days=30, now=now)
    (tmp_path / "c.pem").write_bytes(pki.cert_pem(cert))
    assert keytool.main(["inspect", "--cert", str(tmp_path / "c.pem")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device_id"] == "gw-1"
    assert info["not_after"] == pytest.approx(cert.not_valid_after_utc.timestamp())


@pytest.mark.parametrize("content", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_inspect_refuses_what_is_not_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    (tmp_path / "c.pem").write_bytes(content)
    assert keytool.main(["inspect", "--cert", str(tmp_path / "c.pem")]) == keytool.EXIT_REFUSED
    assert capsys.readouterr().err.strip()


def test_inspect_of_a_missing_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keytool.main(["inspect", "--cert", str(tmp_path / "none.pem")]) == keytool.EXIT_REFUSED


def test_fetch_ca_from_nobody_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = keytool.main(["fetch-ca", "--host", "127.0.0.1", "--port", str(port), "--pin", "ab" * 32,
                         "--timeout", "2"])
    assert code == keytool.EXIT_UNREACHABLE


def test_the_running_agent_modules_do_not_load_cryptography() -> None:
    import subprocess

    code = (
        "import sys, fedge.agent.loop, fedge.agent.identity, fedge.transport.tls, fedge.transport.http; "
        "assert 'cryptography' not in sys.modules, 'cryptography imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Mutual TLS with real processes: the CA commands, enrolment, and every refusal of the security issue.

One coordinator (TLS, the default) serves honest agents that enrol with
one-time tokens and train to the end, while a scripted attacker tries, over
real TLS on 127.0.0.1: no client certificate, a certificate from another CA,
an expired certificate, a revoked one, a reused and an expired token, a CSR
whose signature does not match its key, an update in another device's name,
plaintext HTTP to the TLS port, an oversized CSR, and the admin endpoints
without the admin credential. Then the logs of the whole run are searched
for key material, tokens and update values.
"""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fedge_processes import FEDGE, DigitsFiles, Processes, child_env, free_port, toml_config
from safetensors.numpy import load_file

from fedge import pki
from fedge.wire import encode_update

pytestmark = pytest.mark.slow


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDGE, *args], capture_output=True, text=True, env=child_env(), timeout=60, check=False
    )


def token(data_dir: Path, *extra: str) -> str:
    result = fedge("token", "create", "--data-dir", str(data_dir), *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class Coordinator:
    def __init__(
        self, root: Path, procs: Processes, digits: DigitsFiles, *, rounds: int, agents: int
    ) -> None:
        self.data_dir = root / "store"
        init = fedge("ca", "init", "--data-dir", str(self.data_dir))
        assert init.returncode == 0, init.stderr
        self.init_output = init.stdout
        issue = fedge(
            "ca", "issue-server", "--data-dir", str(self.data_dir), "--host", "localhost", "--ip", "127.0.0.1"
        )
        assert issue.returncode == 0, issue.stderr
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_file = self.data_dir / "ca" / "ca.crt"
        self.admin_token = (self.data_dir / "admin.token").read_text().strip()
        config = root / "coordinator.toml"
        config.write_text(
            toml_config(
                {
                    "task": {"name": "logreg", "eval_data": str(digits.test)},
                    "strategy": {"name": "fedavg"},
                    "rounds": {
                        "count": rounds,
                        "cohort_size": agents,
                        "min_devices": agents,
                        "deadline_s": 20.0,
                        "wait_s": 0.25,
                    },
                    "server": {"host": "127.0.0.1", "port": self.port, "data_dir": str(self.data_dir)},
                }
            )
        )
        self.proc = procs.start("coordinator", "coordinator", "--config", str(config), "--exit-when-done")
        self.admin = httpx.Client(
            base_url=self.url, verify=self.context(), headers={"authorization": f"Bearer {self.admin_token}"}
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.alive() and time.monotonic() < deadline, procs.logs()
            try:
                if self.admin.get("/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        return pki.client_ssl_context(ca_file=self.ca_file, cert_file=cert, key_file=key)

    def status(self) -> dict[str, Any]:
        r = self.admin.get("/v1/status")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


class Device:
    """A scripted device: its own key and certificate, speaking the protocol by hand."""

    def __init__(self, coord: Coordinator, root: Path, device_id: str) -> None:
        self.coord = coord
        self.device_id = device_id
        self.dir = root / f"scripted-{device_id}"
        self.dir.mkdir(parents=True)
        self.key = pki.new_device_key()
        pki.write_private_key(self.dir / "key.pem", self.key)

    def enrol(self, tok: str, csr: bytes | None = None) -> httpx.Response:
        body = {
            "protocol": 1,
            "token": tok,
            "csr_pem": (csr or pki.make_csr(self.key, self.device_id)).decode(),
        }
        with httpx.Client(verify=self.coord.context()) as c:
            r = c.post(f"{self.coord.url}/v1/enrol", json=body)
        if r.status_code == 200:
            (self.dir / "cert.pem").write_text(r.json()["certificate_pem"])
        return r

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.coord.url, verify=self.coord.context(self.dir / "cert.pem", self.dir / "key.pem")
        )


def refused(r: httpx.Response, code: str, status: int) -> None:
    assert (r.status_code, r.json().get("error")) == (status, code), r.text


def handshake_fails(client: httpx.Client, path: str = "/v1/check-in") -> None:
    with pytest.raises((httpx.TransportError, ssl.SSLError)):
        r = client.post(path, json={"protocol": 1, "num_examples": 1})
        # Some TLS 1.3 stacks report the refused certificate only at the first read.
        raise httpx.ReadError(f"unexpectedly answered {r.status_code}")


def foreign_cert(device_id: str, *, ca: pki.CA, now: dt.datetime, days: int, root: Path) -> tuple[Path, Path]:
    key = pki.new_device_key()
    cert = pki.sign_device_csr(
        ca, pki.make_csr(key, device_id), device_id=device_id, valid_days=days, now=now
    )
    (root / f"{device_id}.crt").write_bytes(pki.cert_pem(cert))
    pki.write_private_key(root / f"{device_id}.key", key)
    return root / f"{device_id}.crt", root / f"{device_id}.key"


def expired_cert(device_id: str, *, ca: pki.CA, now: dt.datetime, root: Path) -> tuple[Path, Path]:
    """A client certificate from the right CA that expired yesterday (the CA refuses to make one)."""
    key = pki.new_device_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=31))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    (root / f"{device_id}.crt").write_bytes(pki.cert_pem(cert))
    pki.write_private_key(root / f"{device_id}.key", key)
    return root / f"{device_id}.crt", root / f"{device_id}.key"


def mismatched_csr(device_id: str) -> bytes:
    """A CSR whose signature was made with another key than the one it carries."""
    good = x509.load_pem_x509_csr(pki.make_csr(pki.new_device_key(), device_id))
    other = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    # Same DER layout: swap the public key of one into the other, keeping the signature.
    good_der = good.public_bytes(serialization.Encoding.DER)
    good_spki = good.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other_spki = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(good_spki) == len(other_spki)
    forged = x509.load_der_x509_csr(good_der.replace(good_spki, other_spki))
    assert not forged.is_signature_valid
    return forged.public_bytes(serialization.Encoding.PEM)


def test_mutual_tls_end_to_end_with_every_refusal(
    tmp_path: Path, procs: Processes, digits: Callable[[int], DigitsFiles]
) -> None:
    files = digits(3)
    rounds = 40  # long enough (~10 s) for the attacks below to meet a running round
    coord = Coordinator(tmp_path, procs, files, rounds=rounds, agents=3)
    assert "CA fingerprint (sha256):" in coord.init_output
    for path in (
        coord.data_dir / "ca" / "ca.key",
        coord.data_dir / "tls" / "server.key",
        coord.data_dir / "admin.token",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    tokens = {f"honest-{i}": token(coord.data_dir, "--device-id", f"honest-{i}") for i in range(3)}
    for i, (name, tok) in enumerate(tokens.items()):
        (tmp_path / f"{name}.token").write_text(tok)
        procs.agent(
            name,
            coord.url,
            files.devices[i],
            "--ca-cert",
            str(coord.ca_file),
            "--token-file",
            str(tmp_path / f"{name}.token"),
        )
    deadline = time.monotonic() + 60
    while coord.status()["rounds_complete"] < 1:
        assert time.monotonic() < deadline, procs.logs()
        time.sleep(0.1)

    # No client certificate on a device endpoint.
    with httpx.Client(base_url=coord.url, verify=coord.context()) as anonymous:
        refused(
            anonymous.post("/v1/check-in", json={"protocol": 1, "num_examples": 1}), "no_certificate", 401
        )
        # The admin endpoints without (or with a wrong) admin credential.
        refused(anonymous.get("/v1/status"), "unauthorized", 401)
        refused(anonymous.post("/v1/admin/tokens", json={"protocol": 1}), "unauthorized", 401)
        refused(
            anonymous.post(
                "/v1/admin/tokens", json={"protocol": 1}, headers={"authorization": "Bearer not-the-token"}
            ),
            "unauthorized",
            401,
        )
        refused(anonymous.post("/v1/admin/devices/honest-0/revoke"), "unauthorized", 401)

    # A certificate from another CA, and an expired one from the right CA: the handshake fails.
    now = dt.datetime.now(dt.UTC)
    other_ca = pki.create_ca(now=now)
    crt, key = foreign_cert("intruder", ca=other_ca, now=now, days=30, root=tmp_path)
    with httpx.Client(base_url=coord.url, verify=coord.context(crt, key)) as c:
        handshake_fails(c)
    real_ca = pki.load_ca(coord.data_dir / "ca")
    crt, key = expired_cert("old-device", ca=real_ca, now=now, root=tmp_path)
    with httpx.Client(base_url=coord.url, verify=coord.context(crt, key)) as c:
        handshake_fails(c)
    # A certificate from the right CA that the coordinator never issued (not in its store).
    crt, key = foreign_cert("unrecorded", ca=real_ca, now=now, days=30, root=tmp_path)
    with httpx.Client(base_url=coord.url, verify=coord.context(crt, key)) as c:
        refused(c.post("/v1/check-in", json={"protocol": 1, "num_examples": 1}), "revoked", 403)

    # Plaintext HTTP to the TLS port.
    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"http://127.0.0.1:{coord.port}/v1/check-in",
            json={"protocol": 1, "num_examples": 1},
            headers={"X-Fedge-Device": "honest-0"},
            timeout=5.0,
        )

    # Enrolment: a bad CSR signature, an oversized CSR, a reused and an expired token.
    mallory = Device(coord, tmp_path, "mallory")
    tok = token(coord.data_dir)
    refused(mallory.enrol(tok, mismatched_csr("mallory")), "bad_csr", 400)
    refused(
        mallory.enrol(
            tok,
            b"-----BEGIN CERTIFICATE REQUEST-----\n"
            + b"A" * 20_000
            + b"\n-----END CERTIFICATE REQUEST-----\n",
        ),
        "too_large",
        413,
    )
    assert mallory.enrol(tok).status_code == 200  # the token survived the refused attempts
    refused(Device(coord, tmp_path, "eve").enrol(tok), "bad_token", 403)  # reused
    short = token(coord.data_dir, "--expires", "1s")
    time.sleep(1.5)
    refused(Device(coord, tmp_path, "trent").enrol(short), "bad_token", 403)  # expired
    refused(Device(coord, tmp_path, "honest-1").enrol(token(coord.data_dir)), "device_exists", 409)
    refused(
        Device(coord, tmp_path, "victor").enrol(token(coord.data_dir, "--device-id", "walter")),
        "bad_token",
        403,
    )

    # An update in another device's name: the identity is the certificate's, whatever the header says.
    with mallory.client() as m:
        r = m.post(
            "/v1/check-in", json={"protocol": 1, "num_examples": 5}, headers={"X-Fedge-Device": "honest-0"}
        )
        assert r.status_code == 200, r.text
        open_round = coord.status()["open"]
        round_id = open_round["round"] if open_round else coord.status()["rounds_complete"] + 1
        body = encode_update(
            {"weight": np.zeros((64, 10), np.float32), "bias": np.zeros(10, np.float32)},
            round=round_id,
            attempt=1,
            num_examples=5,
        )
        r = m.post(f"/v1/rounds/{round_id}/update", content=body, headers={"X-Fedge-Device": "honest-0"})
        assert r.status_code in (403, 404, 409), r.text
        assert r.json()["error"] in ("not_invited", "unknown_round", "closed"), r.text
        devices = {d["device_id"]: d for d in coord.admin.get("/v1/admin/devices").json()}
        assert devices["mallory"]["num_examples"] == 5  # the check-in was counted as mallory's
        assert devices["honest-0"]["num_examples"] != 5

        # Revocation: the next request is refused, without a restart.
        revoke = fedge("device", "revoke", "mallory", "--data-dir", str(coord.data_dir))
        assert revoke.returncode == 0, revoke.stderr
        refused(m.post("/v1/check-in", json={"protocol": 1, "num_examples": 5}), "revoked", 403)
    listing = fedge("device", "list", "--data-dir", str(coord.data_dir))
    assert "mallory" in listing.stdout and "revoked" in listing.stdout
    # Honest agents' last check-ins said their policy allows training.
    rows = [line for line in listing.stdout.splitlines() if line.split()[0] in tokens]
    assert rows and any(line.rstrip().endswith("  ok") for line in rows), listing.stdout

    # The honest devices were never disturbed: training reaches the end, everyone exits 0.
    assert coord.proc.wait(120) == 0, procs.logs()
    for name in tokens:
        agent = next(p for p in procs.procs if p.name == name)
        assert agent.wait(30) == 0, procs.logs()
        assert "enrolled as device" in agent.text()
        state = procs.root / "state" / name
        assert stat.S_IMODE((state / "device.key").stat().st_mode) == 0o600
    coord.admin.close()

    # The logs of the whole run hold no key, no token and no update value.
    logs = procs.logs()
    secrets = [coord.admin_token, *tokens.values(), tok, short]
    keys = [p.read_text() for p in tmp_path.rglob("*.key")] + [
        p.read_text() for p in tmp_path.rglob("key.pem")
    ]
    assert "PRIVATE KEY" not in logs
    for secret in secrets:
        assert secret not in logs
    for pem in keys:
        body = "".join(pem.splitlines()[1:-1])
        assert body[:40] not in logs
    model = load_file(str(coord.data_dir / "checkpoints" / f"round-{rounds:06d}.safetensors"))
    values = {f"{v:.6f}" for v in model["weight"].ravel()[:200] if abs(v) > 1e-3}
    assert not [v for v in values if v in logs]

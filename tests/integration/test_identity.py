"""The coordinator's identity service over a real store and CA, and the agent's enrolling transport."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from fedge import pki
from fedge.agent.config import AgentConfig
from fedge.agent.identity import DeviceIdentity, MutualTlsTransport
from fedge.coordinator.identity import Identity, create_token, init_ca, issue_server
from fedge.errors import ConfigError, ProtocolError
from fedge.store import Store
from fedge.transport.base import Response
from fedge.wire import EnrolRequest, RenewRequest


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> tuple[Identity, Store, Clock]:
    init_ca(tmp_path / "data")
    issue_server(tmp_path / "data", hosts=["localhost"], ips=["127.0.0.1"])
    store = Store(tmp_path / "data")
    clock = Clock()
    yield Identity(tmp_path / "data", store, cert_days=30, clock=clock), store, clock
    store.close()


def enrol(identity: Identity, token: str, device_id: str) -> tuple[object, str]:
    key = pki.new_device_key()
    reply = identity.enrol(EnrolRequest(token=token, csr_pem=pki.make_csr(key, device_id).decode()))
    cert = pki.load_cert_pem(reply.certificate_pem.encode())
    return key, pki.serial_hex(cert)


def new_token(store: Store, clock: Clock, device_id: str | None = None, uses: int = 1) -> str:
    return create_token(store, expires_s=60.0, uses=uses, device_id=device_id, now=clock()).token


def test_an_enrolled_device_authenticates_until_revoked(world: tuple[Identity, Store, Clock]) -> None:
    identity, store, clock = world
    _, serial = enrol(identity, new_token(store, clock), "gw-1")
    assert identity.authenticate(("gw-1", serial)) == "gw-1"
    with pytest.raises(ProtocolError, match="no_certificate"):
        identity.authenticate(None)
    with pytest.raises(ProtocolError, match="revoked"):
        identity.authenticate(("gw-2", serial))  # a serial recorded for another device
    store.revoke_device("gw-1", now=clock())
    with pytest.raises(ProtocolError, match="revoked"):
        identity.authenticate(("gw-1", serial))


def test_a_revoked_device_is_refused_before_its_token_is_spent(world: tuple[Identity, Store, Clock]) -> None:
    identity, store, clock = world
    enrol(identity, new_token(store, clock), "gw-1")
    store.revoke_device("gw-1", now=clock())
    token = new_token(store, clock)
    with pytest.raises(ProtocolError) as refused:
        enrol(identity, token, "gw-1")
    assert refused.value.reason == "revoked"
    enrol(identity, token, "gw-2")  # the token still has its use


def test_a_bound_token_moves_an_id_to_a_new_key_and_revokes_the_old(
    world: tuple[Identity, Store, Clock],
) -> None:
    identity, store, clock = world
    _, old = enrol(identity, new_token(store, clock), "gw-1")
    with pytest.raises(ProtocolError) as taken:
        enrol(identity, new_token(store, clock), "gw-1")
    assert taken.value.reason == "device_exists"
    _, new = enrol(identity, new_token(store, clock, device_id="gw-1"), "gw-1")
    assert identity.authenticate(("gw-1", new)) == "gw-1"
    with pytest.raises(ProtocolError, match="revoked"):
        identity.authenticate(("gw-1", old))


@pytest.mark.parametrize(
    ("reason", "make"),
    [
        ("bad_token", lambda store, clock: "never-issued"),
        ("bad_token", lambda store, clock: new_token(store, clock, device_id="someone-else")),
    ],
)
def test_bad_tokens_are_refused(world: tuple[Identity, Store, Clock], reason: str, make: object) -> None:
    identity, store, clock = world
    with pytest.raises(ProtocolError) as refused:
        enrol(identity, make(store, clock), "gw-1")  # type: ignore[operator]
    assert refused.value.reason == reason


def test_renewal_keeps_the_id_and_refuses_another(world: tuple[Identity, Store, Clock]) -> None:
    identity, store, clock = world
    key, _ = enrol(identity, new_token(store, clock), "gw-1")
    reply = identity.renew("gw-1", RenewRequest(csr_pem=pki.make_csr(key, "gw-1").decode()))  # type: ignore[arg-type]
    assert identity.authenticate(("gw-1", pki.serial_hex(pki.load_cert_pem(reply.certificate_pem.encode()))))
    with pytest.raises(ProtocolError) as refused:
        identity.renew("gw-1", RenewRequest(csr_pem=pki.make_csr(key, "gw-2").decode()))  # type: ignore[arg-type]
    assert refused.value.reason == "bad_csr"


def test_the_admin_credential(world: tuple[Identity, Store, Clock], tmp_path: Path) -> None:
    identity, _, _ = world
    token = (tmp_path / "data" / "admin.token").read_text().strip()
    identity.check_admin(f"Bearer {token}")
    for header in (None, "", "Bearer", f"Basic {token}", "Bearer nope"):
        with pytest.raises(ProtocolError, match="unauthorized"):
            identity.check_admin(header)


class FakeCoordinator:
    """Answers /v1/enrol and /v1/renew with the real identity service; counts connections."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.made: list[tuple[Path | None, Path | None]] = []
        self.paths: list[str] = []

    def make(self, ca: Path, cert: Path | None, key: Path | None) -> FakeCoordinator:
        self.made.append((cert, key))
        return self

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout_s: float,
    ) -> Response:
        self.paths.append(path)
        body = json.loads(content or b"{}")
        if path == "/v1/enrol":
            reply = self.identity.enrol(EnrolRequest(**body))
        elif path == "/v1/renew":
            reply = self.identity.renew("dev-1", RenewRequest(**body))
        else:
            return Response(200, {}, b"{}")
        return Response(200, {}, reply.model_dump_json().encode())


def agent_transport(
    world: tuple[Identity, Store, Clock], tmp_path: Path, token: str | None
) -> tuple[MutualTlsTransport, DeviceIdentity, FakeCoordinator]:
    identity, _, clock = world
    state = tmp_path / "state"
    state.mkdir()
    config = AgentConfig(
        coordinator="https://127.0.0.1:1",
        data=tmp_path / "d.npz",
        state_dir=state,
        ca_cert=tmp_path / "data" / "ca" / "ca.crt",
    )
    device = DeviceIdentity(state, "dev-1")
    device.ensure_key()
    fake = FakeCoordinator(identity)
    return MutualTlsTransport(device, fake.make, config=config, token=token, clock=clock), device, fake


def test_the_agent_transport_enrols_then_renews_in_time(
    world: tuple[Identity, Store, Clock], tmp_path: Path
) -> None:
    _, store, clock = world
    transport, device, fake = agent_transport(world, tmp_path, new_token(store, clock))
    transport.request("POST", "/v1/check-in", headers={}, content=b"{}", timeout_s=5)
    assert fake.paths == ["/v1/enrol", "/v1/check-in"]
    assert device.certificate_not_after() is not None
    first = device.cert_file.read_bytes()
    transport.request("POST", "/v1/check-in", headers={}, content=b"{}", timeout_s=5)
    assert fake.paths[-1] == "/v1/check-in" and "/v1/renew" not in fake.paths
    clock.now += 21 * 86400  # past two thirds of 30 days
    transport.request("POST", "/v1/check-in", headers={}, content=b"{}", timeout_s=5)
    assert fake.paths[-2:] == ["/v1/renew", "/v1/check-in"]
    assert device.cert_file.read_bytes() != first
    assert fake.made[-1] == (device.cert_file, device.key_file)  # reconnected with the new certificate


def test_an_agent_without_a_token_is_told_to_get_one(
    world: tuple[Identity, Store, Clock], tmp_path: Path
) -> None:
    transport, _, _ = agent_transport(world, tmp_path, None)
    with pytest.raises(ConfigError, match="not enrolled"):
        transport.request("POST", "/v1/check-in", headers={}, content=b"{}", timeout_s=5)


@pytest.mark.parametrize("device_id", ["gw-1\n", "gw-1\r\n", "gw-1 ", "\ngw-1"])
def test_a_look_alike_id_with_a_newline_is_refused(
    world: tuple[Identity, Store, Clock], device_id: str
) -> None:
    identity, store, clock = world
    enrol(identity, new_token(store, clock), "gw-1")
    key = pki.new_device_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(ProtocolError) as refused:
        identity.enrol(EnrolRequest(token=new_token(store, clock), csr_pem=csr.decode()))
    assert refused.value.reason == "bad_csr"
    assert [d.device_id for d in store.devices()] == ["gw-1"]


def test_without_a_valid_token_nothing_is_said_about_enrolled_ids(
    world: tuple[Identity, Store, Clock],
) -> None:
    identity, store, clock = world
    enrol(identity, new_token(store, clock), "gw-1")
    store.revoke_device("gw-1", now=clock())
    enrol(identity, new_token(store, clock), "gw-2")
    for device_id in ("gw-1", "gw-2", "gw-3"):
        with pytest.raises(ProtocolError) as refused:
            enrol(identity, "not-a-token", device_id)
        assert refused.value.reason == "bad_token"
    used = new_token(store, clock)
    enrol(identity, used, "gw-4")
    assert (
        store.token_refusal(token_hash=pki.hash_secret(used), device_id="gw-5", now=clock()) == "used_token"
    )
    assert (
        store.token_refusal(token_hash=pki.hash_secret("nope"), device_id="gw-5", now=clock())
        == "unknown_token"
    )

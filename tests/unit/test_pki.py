"""fedge.pki: the CA, server and device certificates, their checks, and TLS between them.

Every refusal the module makes has a test that sends the refused input. The
TLS tests run real handshakes on 127.0.0.1 with a server thread; key
generation is EC P-256, so the whole file runs in about a second.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge import pki
from fedge.errors import FedgeError, TransportError

# Whole seconds: X.509 validity has no fractions, so expected bounds compare exactly.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
BACKDATE = dt.timedelta(minutes=5)
DEVICE = "dev-1"
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM


def _reason(excinfo: pytest.ExceptionInfo[pki.PKIError]) -> str:
    return excinfo.value.reason


@pytest.fixture(scope="module")
def ca() -> pki.CA:
    # Made a year ago, so it can sign certificates that are already expired.
    return pki.create_ca(now=NOW - 365 * DAY)


@pytest.fixture(scope="module")
def other_ca() -> pki.CA:
    return pki.create_ca(common_name="someone else's CA", now=NOW - 365 * DAY)


def _device_cert(ca: pki.CA, device_id: str = DEVICE, *, now: dt.datetime = NOW, valid_days: int = 30,
                 key: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
    key = key or pki.new_device_key()
    return pki.sign_device_csr(ca, pki.make_csr(key, device_id), device_id=device_id, valid_days=valid_days,
                               now=now)


def _csr(key: CertificateIssuerPrivateKeyTypes, subject: x509.Name,
         extensions: list[x509.ExtensionType] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension in extensions or []:
        builder = builder.add_extension(extension, critical=False)
    edwards = isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    algorithm = None if edwards else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(PEM)


def _cn(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- the CA


def test_create_ca_is_a_self_signed_p256_ca_that_signs_leaves_only(ca: pki.CA) -> None:
    ca.cert.verify_directly_issued_by(ca.cert)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert ca.cert.subject == ca.cert.issuer == _cn("fedge CA")
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.cert.not_valid_before_utc == NOW - 365 * DAY - BACKDATE
    assert ca.cert.not_valid_after_utc == NOW - 365 * DAY + 3650 * DAY


def test_fingerprint_is_sha256_of_the_der(ca: pki.CA) -> None:
    der = ca.cert.public_bytes(DER)
    expected = hashlib.sha256(der).hexdigest()
    assert ca.fingerprint == pki.fingerprint(ca.cert) == pki.fingerprint(der) == expected
    assert len(expected) == 64 and expected == expected.lower()


@pytest.mark.parametrize("now", [dt.datetime(2030, 1, 1), "2030-01-01", None])
def test_a_naive_or_missing_now_is_refused(now: object) -> None:
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        pki.create_ca(now=now)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"valid_days": 0}, {"valid_days": -1}, {"common_name": ""},
                                    {"common_name": "x" * 65}])
def test_create_ca_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        pki.create_ca(now=NOW, **kwargs)  # type: ignore[arg-type]


def test_save_and_load_the_ca(ca: pki.CA, tmp_path: Path) -> None:
    directory = tmp_path / "data" / "ca"
    key_path, cert_path = pki.save_ca(ca, directory)
    assert (key_path, cert_path) == (directory / "ca.key", directory / "ca.crt")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    loaded = pki.load_ca(directory)
    assert loaded.cert == ca.cert
    assert _spki(loaded.key) == _spki(ca.key)
    assert loaded.fingerprint == ca.fingerprint


def test_save_refuses_to_overwrite_a_ca(ca: pki.CA, other_ca: pki.CA, tmp_path: Path) -> None:
    pki.save_ca(ca, tmp_path)
    with pytest.raises(pki.PKIError) as e:
        pki.save_ca(other_ca, tmp_path)
    assert _reason(e) == "exists"
    assert pki.load_ca(tmp_path).cert == ca.cert


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_key_others_can_read(ca: pki.CA, tmp_path: Path, mode: int) -> None:
    key_path, _ = pki.save_ca(ca, tmp_path)
    key_path.chmod(mode)
    with pytest.raises(pki.PKIError) as e:
        pki.load_ca(tmp_path)
    assert _reason(e) == "insecure_permissions"
    assert "chmod 600" in str(e.value)


@pytest.mark.parametrize("remove", [None, "ca.key", "ca.crt"])
def test_load_of_a_missing_ca_says_how_to_make_one(ca: pki.CA, tmp_path: Path, remove: str | None) -> None:
    if remove is None:
        directory = tmp_path / "nothing-here"
    else:
        directory = tmp_path
        pki.save_ca(ca, directory)
        (directory / remove).unlink()
    with pytest.raises(pki.PKIError) as e:
        pki.load_ca(directory)
    assert _reason(e) == "missing"
    assert "fedge ca init" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("ca.key", b"garbage"),
        ("ca.key", b""),
        ("ca.crt", b"garbage"),
        ("ca.crt", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    ],
)
def test_load_refuses_garbage(ca: pki.CA, tmp_path: Path, name: str, content: bytes) -> None:
    pki.save_ca(ca, tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(pki.PKIError) as e:
        pki.load_ca(tmp_path)
    assert _reason(e) == "bad_file"


def test_load_refuses_a_key_that_is_not_ec(ca: pki.CA, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
    pki.write_private_key(tmp_path / "ca.key", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(pki.PKIError) as e:
        pki.load_ca(tmp_path)
    assert _reason(e) == "bad_file"


def test_load_refuses_a_leaf_certificate_as_ca(ca: pki.CA, tmp_path: Path) -> None:
    key = pki.new_device_key()
    (tmp_path / "ca.crt").write_bytes(pki.cert_pem(_device_cert(ca, key=key)))
    pki.write_private_key(tmp_path / "ca.key", key)
    with pytest.raises(pki.PKIError) as e:
        pki.load_ca(tmp_path)
    assert _reason(e) == "bad_file"


def test_load_refuses_a_key_of_another_ca(ca: pki.CA, other_ca: pki.CA, tmp_path: Path) -> None:
    pki.save_ca(ca, tmp_path)
    (tmp_path / "ca.crt").write_bytes(pki.cert_pem(other_ca.cert))
    with pytest.raises(pki.PKIError) as e:
        pki.load_ca(tmp_path)
    assert _reason(e) == "key_mismatch"


# --------------------------------------------------------------------------- files


def test_write_private_key_is_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "state" / "device.key"
    key = pki.new_device_key()
    pki.write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and _spki(loaded) == _spki(key)
    with pytest.raises(pki.PKIError) as e:
        pki.write_private_key(path, pki.new_device_key())
    assert _reason(e) == "exists"
    assert _spki(serialization.load_pem_private_key(path.read_bytes(), None)) == _spki(key)  # type: ignore[arg-type]


def test_write_private_key_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "device.key").symlink_to(target)
    with pytest.raises(pki.PKIError) as e:
        pki.write_private_key(tmp_path / "device.key", pki.new_device_key())
    assert _reason(e) == "exists"
    assert not target.exists()


def test_write_pem_replaces_atomically_with_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ca.crt"
    pki.write_pem(path, b"one")
    pki.write_pem(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["ca.crt"]  # no temporary file left


def test_pem_round_trips(ca: pki.CA) -> None:
    assert pki.load_cert_pem(pki.cert_pem(ca.cert)) == ca.cert
    key = serialization.load_pem_private_key(pki.key_pem(ca.key), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and _spki(key) == _spki(ca.key)


@pytest.mark.parametrize("data", [b"", b"garbage",
                                  b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_load_cert_pem_refuses_garbage(data: bytes) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.load_cert_pem(data)
    assert _reason(e) == "bad_certificate"
    assert isinstance(e.value, FedgeError)


# --------------------------------------------------------------------------- the server certificate


def test_server_certificate_names_hosts_and_ips_for_server_auth(ca: pki.CA) -> None:
    cert, key = pki.issue_server_cert(ca, hosts=["coord.example", "localhost"], ips=["127.0.0.1", "::1"],
                                      now=NOW)
    cert.verify_directly_issued_by(ca.cert)
    assert isinstance(key.curve, ec.SECP256R1)
    assert _spki(key) == cert.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject == _cn("coord.example")
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + 825 * DAY


def test_server_certificate_for_an_ip_only_is_named_by_it(ca: pki.CA) -> None:
    cert, _ = pki.issue_server_cert(ca, hosts=[], ips=["10.0.0.7", "10.0.0.7"], now=NOW)
    assert cert.subject == _cn("10.0.0.7")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]  # deduplicated


@pytest.mark.parametrize(
    ("hosts", "ips"),
    [
        ([], []),
        ([], ["300.1.1.1"]),
        ([], ["not-an-ip"]),
        ([], [""]),
        (["127.0.0.1"], []),  # an address given as a host name
        (["two words"], []),
        (["-leading.example"], []),
        (["a..b"], []),
        ([""], []),
        (["é.example"], []),
        (["x" * 64 + ".example"], []),
    ],
)
def test_server_certificate_refuses_bad_names(ca: pki.CA, hosts: list[str], ips: list[str]) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.issue_server_cert(ca, hosts=hosts, ips=ips, now=NOW)
    assert _reason(e) == "bad_request"


def test_server_certificate_refuses_a_bare_string_for_a_list(ca: pki.CA) -> None:
    with pytest.raises(TypeError):
        pki.issue_server_cert(ca, hosts="localhost", ips=[], now=NOW)


def test_server_certificate_ends_with_the_ca(ca: pki.CA) -> None:
    short = pki.create_ca(valid_days=10, now=NOW)
    cert, _ = pki.issue_server_cert(short, hosts=["localhost"], ips=[], now=NOW)
    assert cert.not_valid_after_utc == short.cert.not_valid_after_utc


# --------------------------------------------------------------------------- device certificates


def test_device_enrolment_flow(ca: pki.CA) -> None:
    key = pki.new_device_key()
    csr_pem = pki.make_csr(key, DEVICE)
    assert csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    cert = pki.sign_device_csr(ca, csr_pem, device_id=DEVICE, now=NOW)
    assert pki.verify_device_cert(ca, cert, now=NOW) == DEVICE
    assert pki.device_id_of(cert) == DEVICE
    assert cert.subject == _cn(DEVICE) and cert.issuer == ca.cert.subject
    assert cert.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo) == _spki(key)
    ext = cert.extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.key_encipherment
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + 30 * DAY
    assert 0 < cert.serial_number < 2**159
    assert pki.serial_hex(cert) == format(cert.serial_number, "x")
    assert pki.serial_hex(cert) == pki.serial_hex(cert).lower()


def test_serials_are_random(ca: pki.CA) -> None:
    key = pki.new_device_key()
    serials = {_device_cert(ca, key=key).serial_number for _ in range(5)}
    assert len(serials) == 5


@pytest.mark.parametrize("make_key", [
    lambda: ec.generate_private_key(ec.SECP384R1()),
    ed25519.Ed25519PrivateKey.generate,
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
], ids=["p384", "ed25519", "rsa2048"])
def test_other_strong_device_keys_are_accepted(ca: pki.CA, make_key: Callable[[], PrivateKeyTypes]) -> None:
    cert = pki.sign_device_csr(ca, pki.make_csr(make_key(), DEVICE), device_id=DEVICE, now=NOW)
    assert pki.verify_device_cert(ca, cert, now=NOW) == DEVICE


def test_csr_extensions_are_ignored(ca: pki.CA) -> None:
    key = pki.new_device_key()
    csr_pem = _csr(key, _cn(DEVICE), [x509.BasicConstraints(ca=True, path_length=None),
                                      x509.SubjectAlternativeName([x509.DNSName("coord.example")])])
    cert = pki.sign_device_csr(ca, csr_pem, device_id=DEVICE, now=NOW)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_other_subject_fields_of_the_csr_are_ignored(ca: pki.CA) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
                         x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    cert = pki.sign_device_csr(ca, _csr(pki.new_device_key(), subject), device_id=DEVICE, now=NOW)
    assert cert.subject == _cn(DEVICE)


@pytest.mark.parametrize("device_id", ["", "-dev", ".dev", "a" * 65, "two words", "dév", "a/b", "a\nb"])
def test_make_csr_refuses_a_malformed_device_id(device_id: str) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.make_csr(pki.new_device_key(), device_id)
    assert _reason(e) == "bad_request"


def test_make_csr_refuses_a_key_that_cannot_sign() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    with pytest.raises(TypeError):
        pki.make_csr(x25519.X25519PrivateKey.generate(), DEVICE)


def test_a_device_id_of_64_characters_is_accepted(ca: pki.CA) -> None:
    device_id = "a" * 64
    assert pki.verify_device_cert(ca, _device_cert(ca, device_id), now=NOW) == device_id


def test_sign_refuses_a_malformed_device_id(ca: pki.CA) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.sign_device_csr(ca, pki.make_csr(pki.new_device_key(), DEVICE), device_id="bad id", now=NOW)
    assert _reason(e) == "bad_request"


def _swapped_key_csr() -> bytes:
    """A well-formed CSR whose public key is not the key that signed it."""
    signer, other = pki.new_device_key(), pki.new_device_key()
    der = x509.load_pem_x509_csr(pki.make_csr(signer, DEVICE)).public_bytes(DER)
    assert len(_spki(signer)) == len(_spki(other)) and der.count(_spki(signer)) == 1
    return x509.load_der_x509_csr(der.replace(_spki(signer), _spki(other))).public_bytes(PEM)


def _flipped_signature_csr() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pki.make_csr(pki.new_device_key(), DEVICE)).public_bytes(DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    return x509.load_der_x509_csr(bytes(der)).public_bytes(PEM)


@pytest.mark.parametrize("make", [_swapped_key_csr, _flipped_signature_csr],
                         ids=["swapped-key", "flipped-signature"])
def test_sign_refuses_a_csr_not_signed_by_its_key(ca: pki.CA, make: Callable[[], bytes]) -> None:
    csr_pem = make()
    assert not x509.load_pem_x509_csr(csr_pem).is_signature_valid
    with pytest.raises(pki.PKIError) as e:
        pki.sign_device_csr(ca, csr_pem, device_id=DEVICE, now=NOW)
    assert _reason(e) == "bad_csr_signature"


def test_sign_refuses_an_oversized_csr(ca: pki.CA) -> None:
    csr_pem = pki.make_csr(pki.new_device_key(), DEVICE)
    padded = csr_pem + b"\n" * (pki.MAX_CSR_BYTES + 1 - len(csr_pem))
    with pytest.raises(pki.PKIError) as e:
        pki.sign_device_csr(ca, padded, device_id=DEVICE, now=NOW)
    assert _reason(e) == "too_large"


def test_a_csr_of_exactly_the_limit_is_read(ca: pki.CA) -> None:
    csr_pem = pki.make_csr(pki.new_device_key(), DEVICE)
    padded = csr_pem + b"\n" * (pki.MAX_CSR_BYTES - len(csr_pem))
    assert pki.device_id_of(pki.sign_device_csr(ca, padded, device_id=DEVICE, now=NOW)) == DEVICE


@pytest.mark.parametrize("make", [
    lambda ca: b"",
    lambda ca: b"garbage",
    lambda ca: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    lambda ca: pki.make_csr(pki.new_device_key(), DEVICE)[:200],
    lambda ca: pki.cert_pem(ca.cert),
    lambda ca: x509.load_pem_x509_csr(pki.make_csr(pki.new_device_key(), DEVICE)).public_bytes(DER),
], ids=["empty", "garbage", "bad-base64-body", "truncated", "a-certificate", "der-not-pem"])
def test_sign_refuses_what_is_not_a_pem_csr(ca: pki.CA, make: Callable[[pki.CA], bytes]) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.sign_device_csr(ca, make(ca), device_id=DEVICE, now=NOW)
    assert _reason(e) == "bad_csr"


def test_sign_refuses_a_csr_given_as_text(ca: pki.CA) -> None:
    with pytest.raises(TypeError):
        pki.sign_device_csr(ca, pki.make_csr(pki.new_device_key(), DEVICE).decode(),  # type: ignore[arg-type]
                            device_id=DEVICE, now=NOW)


@pytest.mark.parametrize("subject", [
    _cn("dev-2"),
    _cn("DEV-1"),
    x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVICE)]),
    x509.Name([]),
    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE),
               x509.NameAttribute(NameOID.COMMON_NAME, "x")]),
], ids=["other-id", "case", "no-cn", "empty", "two-cns"])
def test_sign_refuses_a_csr_for_another_subject(ca: pki.CA, subject: x509.Name) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.sign_device_csr(ca, _csr(pki.new_device_key(), subject), device_id=DEVICE, now=NOW)
    assert _reason(e) == "wrong_subject"


@pytest.mark.parametrize("make_key", [
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
    lambda: ec.generate_private_key(ec.SECP256K1()),
    lambda: ec.generate_private_key(ec.SECP521R1()),
    ed448.Ed448PrivateKey.generate,
], ids=["rsa1024", "secp256k1", "p521", "ed448"])
def test_sign_refuses_weak_or_unexpected_keys(ca: pki.CA, make_key: Callable[[], PrivateKeyTypes]) -> None:
    key = make_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed448.Ed448PrivateKey)
    with pytest.raises(pki.PKIError) as e:
        pki.sign_device_csr(ca, _csr(key, _cn(DEVICE)), device_id=DEVICE, now=NOW)
    assert _reason(e) == "weak_key"


def test_device_certificate_ends_with_the_ca() -> None:
    short = pki.create_ca(valid_days=10, now=NOW)
    cert = _device_cert(short, valid_days=30)
    assert cert.not_valid_after_utc == short.cert.not_valid_after_utc


@pytest.mark.parametrize("when", [NOW + 11 * DAY, NOW - DAY])
def test_a_ca_outside_its_validity_signs_nothing(when: dt.datetime) -> None:
    short = pki.create_ca(valid_days=10, now=NOW)
    with pytest.raises(pki.PKIError) as e:
        _device_cert(short, now=when)
    assert _reason(e) == "ca_expired"
    with pytest.raises(pki.PKIError) as e:
        pki.issue_server_cert(short, hosts=["localhost"], ips=[], now=when)
    assert _reason(e) == "ca_expired"


@pytest.mark.parametrize("valid_days", [0, -3, True])
def test_sign_refuses_a_non_positive_validity(ca: pki.CA, valid_days: int) -> None:
    with pytest.raises(ValueError, match="valid_days"):
        _device_cert(ca, valid_days=valid_days)


# --------------------------------------------------------------------------- verification


def test_verify_refuses_a_certificate_of_another_ca(ca: pki.CA, other_ca: pki.CA) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.verify_device_cert(ca, _device_cert(other_ca), now=NOW)
    assert _reason(e) == "unknown_issuer"


def test_verify_refuses_a_certificate_with_another_ca_s_name_but_not_its_key(ca: pki.CA) -> None:
    impostor = pki.create_ca(now=NOW - DAY)  # same subject "fedge CA", another key
    assert impostor.cert.subject == ca.cert.subject
    with pytest.raises(pki.PKIError) as e:
        pki.verify_device_cert(ca, _device_cert(impostor), now=NOW)
    assert _reason(e) == "unknown_issuer"


def test_verify_refuses_an_expired_certificate(ca: pki.CA) -> None:
    cert = _device_cert(ca, now=NOW - 100 * DAY, valid_days=30)
    with pytest.raises(pki.PKIError) as e:
        pki.verify_device_cert(ca, cert, now=NOW)
    assert _reason(e) == "expired"
    assert pki.verify_device_cert(ca, cert, now=NOW - 80 * DAY) == DEVICE


def test_verify_refuses_a_certificate_not_yet_valid(ca: pki.CA) -> None:
    cert = _device_cert(ca, now=NOW + 10 * DAY)
    with pytest.raises(pki.PKIError) as e:
        pki.verify_device_cert(ca, cert, now=NOW)
    assert _reason(e) == "not_yet_valid"


def test_verify_refuses_a_server_certificate_as_a_device(ca: pki.CA) -> None:
    cert, _ = pki.issue_server_cert(ca, hosts=["dev-1"], ips=[], now=NOW)  # even one named like a device
    with pytest.raises(pki.PKIError) as e:
        pki.verify_device_cert(ca, cert, now=NOW)
    assert _reason(e) == "wrong_usage"


def test_verify_refuses_the_ca_certificate_itself(ca: pki.CA) -> None:
    with pytest.raises(pki.PKIError) as e:
        pki.verify_device_cert(ca, ca.cert, now=NOW)
    assert _reason(e) == "wrong_usage"


def _cert_with_subject(ca: pki.CA, subject: x509.Name) -> x509.Certificate:
    key = pki.new_device_key()
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


@pytest.mark.parametrize("subject", [
    x509.Name([]),
    x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVICE)]),
    _cn("not a device id"),
    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE),
               x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]),
], ids=["empty", "no-cn", "malformed-cn", "two-cns"])
def test_device_id_of_refuses_a_certificate_without_one_device_id(ca: pki.CA, subject: x509.Name) -> None:
    cert = _cert_with_subject(ca, subject)
    with pytest.raises(pki.PKIError) as e:
        pki.device_id_of(cert)
    assert _reason(e) == "bad_certificate"
    with pytest.raises(pki.PKIError) as e:
        pki.verify_device_cert(ca, cert, now=NOW)
    assert _reason(e) == "bad_certificate"


def test_should_renew_after_two_thirds_of_the_lifetime(ca: pki.CA) -> None:
    cert = _device_cert(ca, valid_days=30)
    # Lifetime 30 d + 5 min from NOW - 5 min: two thirds fall at NOW + 20 d - 1 min 40 s.
    two_thirds = NOW - BACKDATE + (30 * DAY + BACKDATE) * 2 / 3
    assert not pki.should_renew(cert, now=NOW)
    assert not pki.should_renew(cert, now=two_thirds - dt.timedelta(seconds=1))
    assert pki.should_renew(cert, now=two_thirds)
    assert pki.should_renew(cert, now=NOW + 31 * DAY)  # expired: due at once
    assert not pki.should_renew(cert, now=NOW + 25 * DAY, fraction=0.9)
    assert pki.should_renew(cert, now=NOW + DAY, fraction=0.01)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_should_renew_refuses_a_fraction_outside_0_1(ca: pki.CA, fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        pki.should_renew(ca.cert, now=NOW, fraction=fraction)


# --------------------------------------------------------------------------- secrets


def test_new_secret_is_long_random_and_url_safe() -> None:
    secrets = {pki.new_secret() for _ in range(10)}
    assert len(secrets) == 10
    assert all(len(s) == 43 and s.replace("-", "").replace("_", "").isalnum() for s in secrets)
    assert len(pki.new_secret(48)) == 64


@pytest.mark.parametrize("nbytes", [0, 8, 15, True])
def test_new_secret_refuses_a_short_one(nbytes: int) -> None:
    with pytest.raises(ValueError, match="nbytes"):
        pki.new_secret(nbytes)


def test_hash_secret_known_answer() -> None:
    # FIPS 180-2 appendix B.1: SHA-256("abc").
    assert pki.hash_secret("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert pki.hash_secret("tökén") == hashlib.sha256("tökén".encode()).hexdigest()


def test_constant_time_equal() -> None:
    assert pki.constant_time_equal("abc", "abc")
    assert not pki.constant_time_equal("abc", "abd")
    assert not pki.constant_time_equal("abc", "abcd")
    assert not pki.constant_time_equal("", "a")
    assert pki.constant_time_equal("tökén", "tökén")  # not only ASCII
    assert not pki.constant_time_equal("tökén", "token")


def test_pki_error_is_a_one_line_fedge_error() -> None:
    error = pki.PKIError("bad_csr", "first line\nsecond line")
    assert isinstance(error, FedgeError)
    assert error.reason == "bad_csr"
    assert str(error) == "bad_csr: first line second line"


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    device_cert: Path
    device_key: Path
    stranger_cert: Path  # a device certificate from another CA
    stranger_key: Path
    expired_cert: Path
    expired_key: Path
    other_server_cert: Path  # a server certificate from another CA
    other_server_key: Path


@pytest.fixture(scope="module")
def tls(ca: pki.CA, other_ca: pki.CA, tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    d = tmp_path_factory.mktemp("tls")
    pki.write_pem(d / "ca.crt", pki.cert_pem(ca.cert))
    server, server_key = pki.issue_server_cert(ca, hosts=["localhost"], ips=["127.0.0.1"], now=NOW)
    other_server, other_server_key = pki.issue_server_cert(other_ca, hosts=["localhost"], ips=["127.0.0.1"],
                                                           now=NOW)
    pairs = {"server": (server, server_key), "other_server": (other_server, other_server_key)}
    for name, signer, when in [("device", ca, NOW), ("stranger", other_ca, NOW),
                               ("expired", ca, NOW - 100 * DAY)]:
        device_key = pki.new_device_key()
        pairs[name] = (_device_cert(signer, key=device_key, now=when), device_key)
    for name, (cert, key) in pairs.items():
        pki.write_pem(d / f"{name}.crt", pki.cert_pem(cert))
        pki.write_private_key(d / f"{name}.key", key)
    return TlsFiles(d / "ca.crt", d / "server.crt", d / "server.key", d / "device.crt", d / "device.key",
                    d / "stranger.crt", d / "stranger.key", d / "expired.crt", d / "expired.key",
                    d / "other_server.crt", d / "other_server.key")


@dataclass
class Seen:
    """What the server thread saw of its one connection."""

    peer_der: bytes | None = None
    error: BaseException | None = None


@contextmanager
def tls_server(
    context: ssl.SSLContext, respond: Callable[[ssl.SSLSocket], None]
) -> Iterator[tuple[int, Seen]]:
    """A server on 127.0.0.1 that accepts one TLS connection and runs ``respond`` on it."""
    seen = Seen()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True) as s:
                    seen.peer_der = s.getpeercert(binary_form=True)
                    respond(s)
        except (OSError, ssl.SSLError) as e:  # the test reads it; a thread must not raise
            seen.error = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        thread.join(10)
        listener.close()
    assert not thread.is_alive()


def _say_ok(s: ssl.SSLSocket) -> None:
    s.sendall(b"ok")


def _client(port: int, context: ssl.SSLContext, hostname: str = "127.0.0.1") -> bytes | BaseException:
    """What the client read after the handshake, or the error it got."""
    try:
        with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
              context.wrap_socket(raw, server_hostname=hostname) as s):
            assert s.version() == "TLSv1.3"
            return s.recv(16)
    except (OSError, ssl.SSLError) as e:
        return e


def _server_context(tls: TlsFiles) -> ssl.SSLContext:
    return pki.server_ssl_context(cert_file=tls.server_cert, key_file=tls.server_key, ca_file=tls.ca)


def test_server_context_settings(tls: TlsFiles) -> None:
    context = _server_context(tls)
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "fedge CA"),),)]


def test_client_context_trusts_only_the_given_ca(tls: TlsFiles) -> None:
    context = pki.client_ssl_context(ca_file=tls.ca, cert_file=tls.device_cert, key_file=tls.device_key)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "fedge CA"),),)]


def test_client_context_refuses_a_key_without_a_certificate(tls: TlsFiles) -> None:
    with pytest.raises(ValueError, match="key_file"):
        pki.client_ssl_context(ca_file=tls.ca, key_file=tls.device_key)


def test_mutual_tls_handshake_identifies_the_device(tls: TlsFiles) -> None:
    client = pki.client_ssl_context(ca_file=tls.ca, cert_file=tls.device_cert, key_file=tls.device_key)
    with tls_server(_server_context(tls), _say_ok) as (port, seen):
        assert _client(port, client) == b"ok"
    assert seen.error is None and seen.peer_der is not None
    assert pki.device_id_of(x509.load_der_x509_certificate(seen.peer_der)) == DEVICE


def test_the_server_is_also_reached_by_its_host_name(tls: TlsFiles) -> None:
    client = pki.client_ssl_context(ca_file=tls.ca)
    with tls_server(_server_context(tls), _say_ok) as (port, _):
        assert _client(port, client, hostname="localhost") == b"ok"


def test_a_device_without_certificate_connects_unidentified(tls: TlsFiles) -> None:
    client = pki.client_ssl_context(ca_file=tls.ca)
    with tls_server(_server_context(tls), _say_ok) as (port, seen):
        assert _client(port, client) == b"ok"
    assert seen.error is None and seen.peer_der is None


@pytest.mark.parametrize("which", ["stranger", "expired"])
def test_the_server_refuses_a_certificate_it_cannot_verify(tls: TlsFiles, which: str) -> None:
    client = pki.client_ssl_context(ca_file=tls.ca, cert_file=getattr(tls, f"{which}_cert"),
                                    key_file=getattr(tls, f"{which}_key"))
    with tls_server(_server_context(tls), _say_ok) as (port, seen):
        answer = _client(port, client)
    assert isinstance(seen.error, ssl.SSLError) and "certificate verify failed" in str(seen.error)
    assert answer != b"ok"  # TLS 1.3: the client learns it from the server's alert, after its handshake


def test_the_client_refuses_a_server_of_another_ca(tls: TlsFiles) -> None:
    server = pki.server_ssl_context(cert_file=tls.other_server_cert, key_file=tls.other_server_key,
                                    ca_file=tls.ca)
    with tls_server(server, _say_ok) as (port, seen):
        answer = _client(port, pki.client_ssl_context(ca_file=tls.ca))
    assert isinstance(answer, ssl.SSLCertVerificationError)
    assert seen.error is not None


def test_the_client_refuses_a_server_with_another_name(tls: TlsFiles) -> None:
    with tls_server(_server_context(tls), _say_ok) as (port, seen):
        answer = _client(port, pki.client_ssl_context(ca_file=tls.ca), hostname="coord.example")
    assert isinstance(answer, ssl.SSLCertVerificationError) and "coord.example" in str(answer)
    assert seen.error is not None


# --------------------------------------------------------------------------- fetch_pinned_ca


def _http(status: str, body: bytes, headers: str | None = None) -> Callable[[ssl.SSLSocket], None]:
    """A one-shot HTTP server body: read the request, answer ``status`` and ``body``, close."""
    def respond(s: ssl.SSLSocket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = s.recv(4096)
            if not chunk:
                return
            request += chunk
        assert request.startswith(b"GET /v1/ca.pem HTTP/1.1\r\n")
        head = headers if headers is not None else f"Content-Length: {len(body)}\r\n"
        s.sendall(f"HTTP/1.1 {status}\r\n{head}Connection: close\r\n\r\n".encode() + body)
    return respond


def _pin_with_colons(fp: str) -> str:
    return ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()


@pytest.mark.parametrize("styled", [str, _pin_with_colons], ids=["plain", "colons-upper"])
def test_fetch_pinned_ca_returns_the_pinned_ca(ca: pki.CA, tls: TlsFiles,
                                               styled: Callable[[str], str]) -> None:
    with tls_server(_server_context(tls), _http("200 OK", pki.cert_pem(ca.cert))) as (port, seen):
        data = pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=styled(ca.fingerprint), timeout_s=5)
    assert data == pki.cert_pem(ca.cert)
    assert seen.error is None


def test_fetch_pinned_ca_keeps_only_the_pinned_certificate(ca: pki.CA, other_ca: pki.CA,
                                                           tls: TlsFiles) -> None:
    body = pki.cert_pem(ca.cert) + pki.cert_pem(other_ca.cert)  # a second CA must not ride along
    with tls_server(_server_context(tls), _http("200 OK", body)) as (port, _):
        data = pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=ca.fingerprint, timeout_s=5)
    assert data == pki.cert_pem(ca.cert)


def test_fetch_pinned_ca_reads_to_the_close_without_a_length(ca: pki.CA, tls: TlsFiles) -> None:
    with tls_server(_server_context(tls), _http("200 OK", pki.cert_pem(ca.cert), headers="")) as (port, _):
        data = pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=ca.fingerprint, timeout_s=5)
    assert data == pki.cert_pem(ca.cert)


def test_fetch_pinned_ca_refuses_another_ca(ca: pki.CA, other_ca: pki.CA, tls: TlsFiles) -> None:
    with (
        tls_server(_server_context(tls), _http("200 OK", pki.cert_pem(ca.cert))) as (port, _),
        pytest.raises(pki.PKIError) as e,
    ):
        pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=other_ca.fingerprint, timeout_s=5)
    assert _reason(e) == "pin_mismatch"


def test_fetch_pinned_ca_refuses_a_server_the_ca_did_not_certify(ca: pki.CA, tls: TlsFiles) -> None:
    # The pinned CA, replayed by a server holding a certificate of another CA.
    server = pki.server_ssl_context(cert_file=tls.other_server_cert, key_file=tls.other_server_key,
                                    ca_file=tls.ca)
    with (
        tls_server(server, _http("200 OK", pki.cert_pem(ca.cert))) as (port, _),
        pytest.raises(pki.PKIError) as e,
    ):
        pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=ca.fingerprint, timeout_s=5)
    assert _reason(e) == "pin_mismatch"


@pytest.mark.parametrize(("status", "body", "headers"), [
    ("404 Not Found", b"not found", None),
    ("200 OK", b"garbage", None),
    ("200 OK", b"", None),
    ("200 OK", b"x" * (100 * 1024), None),
    ("200 OK", b"x" * (70 * 1024), ""),
    ("200 OK", b"5\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding: chunked\r\n"),
    ("200 OK", b"short", "Content-Length: 500\r\n"),
    ("200 OK", b"abc", "Content-Length: -1\r\n"),
    ("200 OK", b"abc", "not a header\r\n"),
], ids=["404", "garbage", "empty", "oversized", "oversized-no-length", "chunked", "length-too-long",
        "length-negative", "malformed-header"])
def test_fetch_pinned_ca_refuses_a_bad_answer(ca: pki.CA, tls: TlsFiles, status: str, body: bytes,
                                              headers: str | None) -> None:
    with (
        tls_server(_server_context(tls), _http(status, body, headers)) as (port, _),
        pytest.raises(pki.PKIError) as e,
    ):
        pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=ca.fingerprint, timeout_s=5)
    assert _reason(e) == "bad_response"


def test_fetch_pinned_ca_refuses_what_is_not_http(ca: pki.CA, tls: TlsFiles) -> None:
    def respond(s: ssl.SSLSocket) -> None:
        s.recv(4096)
        s.sendall(b"hello")

    with (
        tls_server(_server_context(tls), respond) as (port, _),
        pytest.raises(pki.PKIError) as e,
    ):
        pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=ca.fingerprint, timeout_s=5)
    assert _reason(e) == "bad_response"


def test_fetch_pinned_ca_gives_up_on_a_silent_server(ca: pki.CA, tls: TlsFiles) -> None:
    def respond(s: ssl.SSLSocket) -> None:
        while s.recv(4096):  # never answers; returns when the client gives up
            pass

    with (
        tls_server(_server_context(tls), respond) as (port, _),
        pytest.raises(TransportError, match="cannot fetch the CA"),
    ):
        pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=ca.fingerprint, timeout_s=0.3)


def test_fetch_pinned_ca_from_nobody_is_a_transport_error(ca: pki.CA) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again before the fetch: nothing listens there
    with pytest.raises(TransportError):
        pki.fetch_pinned_ca("127.0.0.1", port, pin_sha256=ca.fingerprint, timeout_s=2)


@pytest.mark.parametrize("pin", ["", "abc", "g" * 64, "a" * 63, "a" * 65])
def test_fetch_pinned_ca_refuses_a_malformed_pin(pin: str) -> None:
    with pytest.raises(ValueError, match="pin_sha256"):
        pki.fetch_pinned_ca("127.0.0.1", 1, pin_sha256=pin)


def test_this_module_stays_light_for_devices() -> None:
    import subprocess
    import sys

    code = ("import sys, fedge.pki; heavy = {'numpy', 'pydantic', 'fastapi', 'httpx'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "error"})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("device_id", ["gw-1\n", "gw\n1"])
def test_a_device_id_with_a_newline_is_refused(device_id: str) -> None:
    with pytest.raises(pki.PKIError):
        pki.make_csr(pki.new_device_key(), device_id)
    assert not pki.DEVICE_ID_PATTERN.fullmatch(device_id)

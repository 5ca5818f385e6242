"""The fedge certificate authority and device identity: small recipes over ``cryptography`` and ``ssl``.

What it holds: creating, saving and loading the CA; the coordinator's server
certificate; the device's key, its CSR and the certificate the CA signs for
it; checks of a device certificate outside TLS; the TLS contexts of both
sides; fetching the CA by a pinned fingerprint; enrolment and admin secrets.
It imports only the standard library and ``cryptography`` because the agent
imports it on small devices. Time is always an argument (``now``, a
timezone-aware ``datetime``), so tests can make expired certificates.

Trust model:

* The CA (ECDSA P-256, self-signed, ``path_length=0``) lives in the
  coordinator's data directory; ``ca.key`` is 0600 and :func:`load_ca` refuses it otherwise.
* A device key is generated on the device and never leaves it: the device sends
  a CSR, and the CA binds the key to ``CN=<device id>`` taken from the enrolment,
  never from the CSR's other fields. That CN is the device's identity in mutual TLS.
* Device certificates live 30 days; the agent renews at two thirds (:func:`should_renew`).
* An agent given only the CA's SHA-256 fingerprint fetches the CA once over
  unverified TLS and keeps it only if it matches the pin (:func:`fetch_pinned_ca`).

Every refusal raises :class:`PKIError` with a stable ``reason`` code.
Malformed programmer arguments (a naive ``now``, a non-positive validity)
raise ``ValueError`` or ``TypeError`` naming the argument.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.errors import FedgeError, TransportError

# The TLS contexts need the stdlib alone: they live where the agent can import
# them without cryptography (see fedge.transport.tls); re-exported here.
from fedge.transport.tls import client_ssl_context, server_ssl_context

__all__ = [
    "CA",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEVICE_ID_PATTERN",
    "MAX_CSR_BYTES",
    "PKIError",
    "cert_pem",
    "client_ssl_context",
    "constant_time_equal",
    "create_ca",
    "device_id_of",
    "fetch_pinned_ca",
    "fingerprint",
    "hash_secret",
    "issue_server_cert",
    "key_pem",
    "load_ca",
    "load_cert_pem",
    "make_csr",
    "new_device_key",
    "new_secret",
    "save_ca",
    "serial_hex",
    "server_ssl_context",
    "should_renew",
    "sign_device_csr",
    "verify_device_cert",
    "write_pem",
    "write_private_key",
]

# Always used with fullmatch: "$" alone would also accept a trailing newline.
# The same literal as fedge.wire.DEVICE_ID_PATTERN, copied rather than imported:
# wire imports numpy and pydantic, and this module must stay light for devices.
DEVICE_ID_PATTERN: re.Pattern[str] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CSR_BYTES = 16 * 1024

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"

# Certificates start this much before `now`, so a peer whose clock is a little
# behind does not see a fresh certificate as not yet valid.
_BACKDATE = dt.timedelta(minutes=5)
_MAX_CA_BODY_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 16 * 1024
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_COMMON_NAME_MAX = 64  # ub-common-name in RFC 5280


class PKIError(FedgeError):
    """A certificate, key, CSR or CA file was refused; ``reason`` is a stable code.

    Codes: ``exists``, ``missing``, ``bad_file``, ``insecure_permissions``,
    ``key_mismatch``, ``bad_request``, ``too_large``, ``bad_csr``,
    ``bad_csr_signature``, ``weak_key``, ``wrong_subject``, ``ca_expired``,
    ``bad_certificate``, ``unknown_issuer``, ``expired``, ``not_yet_valid``,
    ``wrong_usage``, ``pin_mismatch``, ``bad_response``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = " ".join(detail.split())  # one line, whatever the detail quoted
        super().__init__(f"{reason}: {self.detail}")


@dataclass(frozen=True)
class CA:
    """A loaded certificate authority: its self-signed certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate's DER, lowercase hex without colons (what agents pin)."""
        return fingerprint(self.cert)


# --------------------------------------------------------------------------- time and names


def _utc(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be a timezone-aware datetime, got {now!r}")
    return now.astimezone(dt.UTC)


def _validity(days: float, name: str) -> dt.timedelta:
    if isinstance(days, bool) or not isinstance(days, int | float) or not days > 0:
        raise ValueError(f"{name} must be a positive number of days, got {days!r}")
    return dt.timedelta(days=days)


def _check_device_id(device_id: object) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise PKIError("bad_request", f"device id {device_id!r} is not 1-64 letters, digits, '.', '_', '-' "
                                      "starting with a letter or digit")
    return device_id


def _common_name(name: x509.Name) -> str | None:
    """The single CN of ``name`` as text, or ``None`` when there is none, several, or not text."""
    try:
        values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; every other key type signs a SHA-256 digest.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


# --------------------------------------------------------------------------- files


def _ensure_dir(directory: Path) -> None:
    # New directories are private (0700); an existing one is left as the operator made it.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_key(path: Path, key: PrivateKeyTypes) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to a new file with mode 0600.

    The file is created with its final mode (``O_CREAT | O_EXCL``), so the
    key is never readable by others, not even for an instant, and an existing
    key (or a symlink planted in its place) is never overwritten.

    Raises:
        PKIError: ``exists`` when ``path`` exists.
    """
    path = Path(path)
    data = key_pem(key)
    _ensure_dir(path.parent)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise PKIError("exists", f"{path} already exists; a key is never overwritten") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_pem(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` atomically with ``data`` (temporary file, fsync, rename, fsync of the directory).

    A reader sees the old file or the new one, never a half-written one.
    """
    path = Path(path)
    _ensure_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKeyTypes) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (the file mode is what protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_cert_pem(data: bytes) -> x509.Certificate:
    """The first certificate in PEM ``data``.

    Raises:
        PKIError: ``bad_certificate`` when ``data`` holds no readable PEM certificate.
    """
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as e:
        raise PKIError("bad_certificate", f"not a PEM certificate ({e})") from None


def fingerprint(cert_or_der: x509.Certificate | bytes) -> str:
    """SHA-256 of a certificate's DER encoding, lowercase hex without colons."""
    if isinstance(cert_or_der, bytes):
        return hashlib.sha256(cert_or_der).hexdigest()
    return hashlib.sha256(cert_or_der.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(cert: x509.Certificate) -> str:
    """The certificate's serial number in lowercase hex (how the store names certificates)."""
    return format(cert.serial_number, "x")


# --------------------------------------------------------------------------- the CA


def create_ca(*, common_name: str = "fedge CA", valid_days: int = 3650, now: dt.datetime) -> CA:
    """A new CA: an ECDSA P-256 key and a self-signed certificate valid from ``now`` for ``valid_days``.

    The CA may sign leaf certificates only (``path_length=0``): fedge has no
    intermediate CAs, so a leaf can never act as one.
    """
    now = _utc(now)
    lifetime = _validity(valid_days, "valid_days")
    if not isinstance(common_name, str) or not 0 < len(common_name) <= _COMMON_NAME_MAX:
        raise ValueError(f"common_name must be 1-{_COMMON_NAME_MAX} characters, got {common_name!r}")
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(cert=cert, key=key)


def save_ca(ca: CA, directory: Path) -> tuple[Path, Path]:
    """Write ``directory/ca.key`` (mode 0600) and ``directory/ca.crt``; return their paths.

    Raises:
        PKIError: ``exists`` when ``directory`` already holds a CA key.
    """
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
    _ensure_dir(directory)
    try:
        write_private_key(key_path, ca.key)
    except PKIError:
        raise PKIError("exists", f"{directory} already holds a CA key ({key_path}); it is never "
                                 "overwritten: every device would have to enrol again") from None
    try:
        write_pem(cert_path, cert_pem(ca.cert))
    except BaseException:
        key_path.unlink(missing_ok=True)  # no half CA: a key without its certificate
        raise
    return key_path, cert_path


def load_ca(directory: Path) -> CA:
    """Load the CA from ``directory/ca.key`` and ``directory/ca.crt``.

    Raises:
        PKIError: ``missing`` (no CA there yet); ``insecure_permissions``
            (``ca.key`` readable or writable by group or others);
            ``bad_file`` (unreadable, not PEM, not an EC key, not a CA
            certificate); ``key_mismatch`` (the key is not the certificate's).
    """
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
    for p in (key_path, cert_path):
        if not p.exists():
            raise PKIError("missing", f"no CA in {directory} ({p.name} missing): run `fedge ca init` first")
    try:
        fd = os.open(key_path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            # The mode is checked on the file actually read (fstat), not on the name.
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise PKIError("insecure_permissions",
                               f"{key_path} has mode {mode & 0o777:04o}, readable by others: "
                               f"`chmod 600 {key_path}` (and consider the CA key leaked if it was shared)")
            key_data = f.read()
        cert_data = cert_path.read_bytes()
    except OSError as e:
        raise PKIError("bad_file", f"cannot read the CA in {directory}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PKIError("bad_file", f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("bad_file", f"{key_path} is not an EC private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError:
        raise PKIError("bad_file", f"{cert_path} is not a PEM certificate") from None
    if not _is_ca(cert):
        raise PKIError("bad_file", f"{cert_path} is not a CA certificate")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise PKIError("key_mismatch", f"{key_path} is not the key of {cert_path}")
    return CA(cert=cert, key=key)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _leaf_validity(ca: CA, now: dt.datetime, lifetime: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    """``[now - 5 min, now + lifetime]`` clamped to the CA's own validity."""
    ca_start, ca_end = ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc
    if not ca_start <= now < ca_end:
        raise PKIError("ca_expired", f"the CA is valid from {ca_start.isoformat()} to {ca_end.isoformat()}, "
                                     f"not at {now.isoformat()}: create a new CA")
    return max(now - _BACKDATE, ca_start), min(now + lifetime, ca_end)


def _leaf_builder(
    ca: CA, subject: x509.Name, public: CertificatePublicKeyTypes, start: dt.datetime, end: dt.datetime,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    try:
        ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
    )


def _check_host(host: object) -> str:
    if not isinstance(host, str):
        raise PKIError("bad_request", f"a host name must be text, got {host!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise PKIError("bad_request", f"{host!r} is an IP address: give it as an ip, not a host")
    labels = host.removesuffix(".").split(".")
    if not 0 < len(host) <= 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise PKIError("bad_request", f"{host!r} is not a DNS host name (letters, digits, '-', '_' and dots)")
    return host.removesuffix(".")


def issue_server_cert(
    ca: CA, *, hosts: Sequence[str], ips: Sequence[str], valid_days: int = 825, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new ECDSA P-256 key and a server certificate for it, naming ``hosts`` and ``ips``.

    Returns:
        The certificate (``serverAuth`` only, not a CA) and its key.

    Raises:
        PKIError: ``bad_request`` for no name at all, a malformed host name
            or IP address; ``ca_expired`` when the CA is not valid at ``now``.
    """
    now = _utc(now)
    lifetime = _validity(valid_days, "valid_days")
    if isinstance(hosts, str) or isinstance(ips, str):
        raise TypeError("hosts and ips must be sequences of strings, not a string")
    names = list(dict.fromkeys(_check_host(h) for h in hosts))
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in ips:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise PKIError("bad_request", f"{ip!r} is not an IP address") from None
        if address not in addresses:
            addresses.append(address)
    if not names and not addresses:
        raise PKIError("bad_request", "a server certificate needs at least one host name or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in names]
    sans += [x509.IPAddress(a) for a in addresses]
    first = names[0] if names else str(addresses[0])
    # TLS clients match the SANs, not the CN; the CN is for people reading the certificate.
    common_name = first if len(first) <= _COMMON_NAME_MAX else "fedge coordinator"
    start, end = _leaf_validity(ca, now, lifetime)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _leaf_builder(ca, _name(common_name), key.public_key(), start, end, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


# --------------------------------------------------------------------------- devices


def new_device_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 device key (generate it on the device; it never leaves it)."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKeyTypes, device_id: str) -> bytes:
    """A PEM certificate signing request for ``key`` with subject ``CN=<device_id>``.

    Raises:
        PKIError: ``bad_request`` when ``device_id`` does not match :data:`DEVICE_ID_PATTERN`.
        TypeError: ``key`` cannot sign (not EC, Ed25519 or RSA).
    """
    _check_device_id(device_id)
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"key must be an EC, Ed25519 or RSA private key, got {type(key).__name__}")
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(device_id)).sign(key, _hash_for(key))
    return csr.public_bytes(serialization.Encoding.PEM)


def _check_device_key(key: CertificatePublicKeyTypes) -> None:
    """Accept EC P-256/P-384, Ed25519 and RSA of at least 2048 bits; refuse everything else."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            return
        raise PKIError("weak_key", f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= 2048:
            return
        raise PKIError("weak_key", f"an RSA key of {key.key_size} bits is too weak (at least 2048)")
    raise PKIError("weak_key", "only EC P-256/P-384, Ed25519 and RSA (2048 bits or more) keys are accepted")


def sign_device_csr(
    ca: CA, csr_pem: bytes, *, device_id: str, valid_days: int = 30, now: dt.datetime
) -> x509.Certificate:
    """Sign a device certificate for the key in ``csr_pem``, bound to ``device_id``.

    The CSR contributes its public key and nothing else: the subject is built
    from ``device_id`` and the CSR's extensions (a request to be a CA, extra
    names) are ignored. The certificate is for client authentication only,
    valid from five minutes before ``now`` for ``valid_days`` (never beyond
    the CA), with a random 159-bit serial.

    Raises:
        PKIError: ``too_large`` (over :data:`MAX_CSR_BYTES`); ``bad_csr`` (not
            a PEM CSR); ``weak_key`` (key type or size refused);
            ``bad_csr_signature`` (the CSR is not signed by its own key:
            whoever sent it does not hold the key); ``wrong_subject`` (the
            CSR's CN is not ``device_id``); ``bad_request`` (``device_id``
            malformed); ``ca_expired``.
    """
    now = _utc(now)
    lifetime = _validity(valid_days, "valid_days")
    _check_device_id(device_id)
    if not isinstance(csr_pem, bytes):
        raise TypeError(f"csr_pem must be bytes, got {type(csr_pem).__name__}")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PKIError("too_large", f"a CSR of {len(csr_pem)} bytes exceeds {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise PKIError("bad_csr", "not a PEM certificate signing request") from None
    try:
        public = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError("weak_key", "the CSR's public key is of an unsupported type") from None
    _check_device_key(public)
    try:
        signed = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        signed = False
    if not signed:
        # Proof of possession: without it anyone could get a certificate for someone else's public key.
        raise PKIError("bad_csr_signature", "the CSR's signature does not match its public key")
    if _common_name(csr.subject) != device_id:
        raise PKIError("wrong_subject", f"the CSR's subject must be exactly one CN={device_id}")
    start, end = _leaf_validity(ca, now, lifetime)
    return _leaf_builder(ca, _name(device_id), public, start, end, ExtendedKeyUsageOID.CLIENT_AUTH).sign(
        ca.key, hashes.SHA256()
    )


def device_id_of(cert: x509.Certificate) -> str:
    """The device id a certificate names (its single CN).

    Raises:
        PKIError: ``bad_certificate`` when the CN is missing, repeated or not a device id.
    """
    value = _common_name(cert.subject)
    if value is None or not DEVICE_ID_PATTERN.fullmatch(value):
        raise PKIError("bad_certificate", "the certificate's subject is not a single CN=<device id>")
    return value


def verify_device_cert(ca: CA, cert: x509.Certificate, *, now: dt.datetime) -> str:
    """Check a device certificate outside TLS; return the device id it names.

    Checks, in order: signed by this CA, valid at ``now``, issued for client
    authentication (and not a CA), subject a device id.

    Raises:
        PKIError: ``unknown_issuer``, ``not_yet_valid``, ``expired``,
            ``wrong_usage`` or ``bad_certificate``.
    """
    now = _utc(now)
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise PKIError("unknown_issuer", "the certificate was not issued by this CA") from None
    if now < cert.not_valid_before_utc:
        raise PKIError("not_yet_valid",
                       f"the certificate is valid from {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise PKIError("expired", f"the certificate expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        raise PKIError("wrong_usage", "the certificate has no extended key usage (clientAuth)") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages or _is_ca(cert):
        raise PKIError("wrong_usage", "the certificate is not a client (device) certificate")
    return device_id_of(cert)


def should_renew(cert: x509.Certificate, *, now: dt.datetime, fraction: float = 2 / 3) -> bool:
    """Whether ``fraction`` of the certificate's validity period has elapsed at ``now``.

    Renewing at two thirds leaves a 30-day certificate ten days of retries
    before it expires; an expired certificate is always due.
    """
    now = _utc(now)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= start + (end - start) * fraction


# --------------------------------------------------------------------------- secrets


def new_secret(nbytes: int = 32) -> str:
    """A new URL-safe random secret (enrolment tokens, the admin token)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 16:
        raise ValueError(f"nbytes must be an integer of at least 16, got {nbytes!r}")
    return secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    """SHA-256 of a secret, hex: what the store keeps instead of the secret.

    A plain hash suffices because the secrets are 256-bit random tokens, not
    passwords: there is nothing to guess.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    """``a == b`` in time independent of where they differ (for secrets and their hashes)."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# --------------------------------------------------------------------------- TLS


def _normalise_pin(pin_sha256: str) -> str:
    pin = pin_sha256.replace(":", "").strip().lower() if isinstance(pin_sha256, str) else ""
    if not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise ValueError(f"pin_sha256 must be a SHA-256 fingerprint (64 hex digits, colons allowed), "
                         f"got {pin_sha256!r}")
    return pin


def fetch_pinned_ca(host: str, port: int, *, pin_sha256: str, timeout_s: float = 10.0) -> bytes:
    """Fetch the coordinator's CA over unverified TLS and keep it only if it matches the pin.

    Nothing received is trusted until checked: the certificate in the body of
    ``GET /v1/ca.pem`` must have the SHA-256 fingerprint ``pin_sha256``
    (compared in constant time), and the server's own certificate must be
    signed by it. What is returned is that one certificate re-encoded, never
    the body as received, so nothing else in the body can slip into the
    device's trust store.

    Returns:
        The CA certificate as PEM.

    Raises:
        PKIError: ``pin_mismatch`` (the CA is not the pinned one, or the server
            is not certified by it); ``bad_response`` (not an HTTP 200 with a
            PEM certificate of at most 64 KiB).
        TransportError: the server cannot be reached, or the TLS handshake or read failed.
        ValueError: ``pin_sha256`` or ``host`` is malformed.
    """
    pin = _normalise_pin(pin_sha256)
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, got {host!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Deliberately unverified: the pin, checked below, is the trust anchor here.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout_s
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            leaf_der = tls.getpeercert(binary_form=True)
            tls.sendall(_ca_request(host, port))
            response = _read_response(tls, deadline)
    except (OSError, ssl.SSLError) as e:
        raise TransportError(f"cannot fetch the CA from {host}:{port}: {e}") from None
    try:
        ca_cert = load_cert_pem(_ca_body(response))
    except PKIError as e:
        if e.reason != "bad_certificate":
            raise
        raise PKIError("bad_response", f"GET /v1/ca.pem answered no PEM certificate ({e.detail})") from None
    if not hmac.compare_digest(fingerprint(ca_cert).encode(), pin.encode()):
        raise PKIError("pin_mismatch", f"the CA served by {host}:{port} has fingerprint "
                                       f"{fingerprint(ca_cert)}, not the pinned {pin}")
    try:
        if leaf_der is None:
            raise ValueError("no server certificate")
        x509.load_der_x509_certificate(leaf_der).verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise PKIError("pin_mismatch",
                       f"the server at {host}:{port} is not certified by the pinned CA") from None
    return cert_pem(ca_cert)


def _ca_request(host: str, port: int) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (f"GET /v1/ca.pem HTTP/1.1\r\nHost: {authority}\r\nAccept: application/x-pem-file\r\n"
            "User-Agent: fedge-agent\r\nConnection: close\r\n\r\n").encode("ascii")


def _read_response(tls: ssl.SSLSocket, deadline: float) -> bytes:
    """Read until the server closes, within ``deadline`` and the size limits."""
    limit = _MAX_HEADER_BYTES + _MAX_CA_BODY_BYTES
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the server did not finish its answer in time")
        tls.settimeout(remaining)
        chunk = tls.recv(16384)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PKIError("bad_response", f"the answer exceeds {limit} bytes")


def _ca_body(response: bytes) -> bytes:
    """The body of an HTTP/1.1 200 answer with a Content-Length (or read to the close)."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep or len(head) > _MAX_HEADER_BYTES:
        raise PKIError("bad_response", "not an HTTP answer")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise PKIError("bad_response", f"GET /v1/ca.pem answered {lines[0][:80]!r}, not 200")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise PKIError("bad_response", "a malformed HTTP header")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise PKIError("bad_response", "a CA sent with a transfer encoding (expected a Content-Length)")
    if "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit() or int(length) > _MAX_CA_BODY_BYTES or int(length) > len(body):
            raise PKIError("bad_response", f"Content-Length {length[:20]!r} does not fit the answer")
        body = body[: int(length)]
    if len(body) > _MAX_CA_BODY_BYTES:
        raise PKIError("bad_response", f"the CA exceeds {_MAX_CA_BODY_BYTES} bytes")
    return body

"""Device identity on the coordinator: the CA's files, enrolment, renewal, revocation, admin access.

The trust model (docs/security.md): the coordinator's data directory holds a
private CA (``ca/ca.key``, mode 0600). A device generates its key on the
device and sends only a CSR, with a one-time enrolment token, over TLS; the
coordinator signs a client certificate whose subject is the device id. From
then on the device id of every request is the verified certificate's, never
anything in a header or body. Revoking a device marks it and its
certificates in the store, and every request checks the store, so the next
request is refused without a restart. Tokens and the admin credential are
kept only as SHA-256 hashes; none of them, and no key, is ever logged.

The operator's commands (``fedge ca init``, ``fedge token create``, ``fedge
device revoke``...) work on the data directory directly, so they take effect
on a running coordinator (SQLite in WAL mode serves both processes).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedge import pki
from fedge.errors import ConfigError, ProtocolError
from fedge.store import Store, TokenError
from fedge.wire import REFUSALS, EnrolReply, EnrolRequest, RenewRequest, TokenReply, TokenRequest

__all__ = ["Identity", "TlsFiles", "create_token", "init_ca", "issue_server", "tls_files"]

logger = logging.getLogger(__name__)


def _refusal(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail, REFUSALS[reason])


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC)


@dataclass(frozen=True)
class TlsFiles:
    """Where a coordinator's CA, server certificate and admin token live in its data directory."""

    ca_dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    admin_token: Path


def tls_files(data_dir: str | os.PathLike[str]) -> TlsFiles:
    d = Path(data_dir)
    return TlsFiles(
        ca_dir=d / "ca",
        ca_cert=d / "ca" / "ca.crt",
        server_cert=d / "tls" / "server.crt",
        server_key=d / "tls" / "server.key",
        admin_token=d / "admin.token",
    )


def init_ca(data_dir: str | os.PathLike[str], *, now: float | None = None) -> tuple[pki.CA, str]:
    """Create the CA and the admin token in ``data_dir``; return the CA and the token (shown once).

    Raises:
        ConfigError: a CA already exists there.
    """
    files = tls_files(data_dir)
    if (files.ca_dir / "ca.key").exists():
        raise ConfigError(
            f"{files.ca_dir} already holds a CA; remove it first to start a new one "
            "(every device then has to enrol again)"
        )
    ca = pki.create_ca(now=_utc(time.time() if now is None else now))
    pki.save_ca(ca, files.ca_dir)
    token = pki.new_secret()
    with Store(data_dir) as store:
        store.set_admin_token_hash(pki.hash_secret(token))
    _write_secret(files.admin_token, token + "\n")
    return ca, token


def _write_secret(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from the start (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def issue_server(
    data_dir: str | os.PathLike[str], *, hosts: Sequence[str], ips: Sequence[str], now: float | None = None
) -> Path:
    """Sign a server certificate for ``hosts`` and ``ips`` with the CA; write it and its key.

    Raises:
        ConfigError: no CA yet, no name given, or a malformed address.
    """
    files = tls_files(data_dir)
    if not hosts and not ips:
        raise ConfigError("give the server's names: --host NAME and/or --ip ADDRESS")
    ca = _load_ca(files)
    try:
        cert, key = pki.issue_server_cert(
            ca, hosts=hosts, ips=ips, now=_utc(time.time() if now is None else now)
        )
    except pki.PKIError as e:
        raise ConfigError(str(e)) from None
    if files.server_key.exists():
        files.server_key.unlink()  # a new key with every server certificate
    pki.write_private_key(files.server_key, key)
    pki.write_pem(files.server_cert, pki.cert_pem(cert))
    return files.server_cert


def create_token(
    store: Store, *, expires_s: float, uses: int, device_id: str | None, now: float
) -> TokenReply:
    """A new enrolment token; the store keeps its hash only."""
    token = pki.new_secret()
    expires_at = now + expires_s
    store.create_token(
        token_hash=pki.hash_secret(token), expires_at=expires_at, uses=uses, device_id=device_id, now=now
    )
    return TokenReply(token=token, expires_at=expires_at, uses=uses, device_id=device_id)


def _load_ca(files: TlsFiles) -> pki.CA:
    try:
        return pki.load_ca(files.ca_dir)
    except pki.PKIError as e:
        raise ConfigError(str(e)) from None


def _adopt_admin_token(files: TlsFiles, store: Store) -> None:
    """Take the admin token from ``admin.token`` when the store has none.

    That is the case when the CA was made elsewhere and its files were put
    in place (a Kubernetes Secret, a restored backup of the files without the
    store): the store learns the token's hash, and the file stays the
    operator's copy.

    Raises:
        ConfigError: ``admin.token`` is readable by others, or not a token.
    """
    if store.admin_token_hash() is not None or not files.admin_token.exists():
        return
    if files.admin_token.stat().st_mode & 0o077:
        raise ConfigError(f"{files.admin_token} is readable by other users; chmod 600 it")
    token = files.admin_token.read_text(encoding="utf-8").strip()
    if len(token) < 32 or not token.isascii() or any(c.isspace() for c in token):
        raise ConfigError(f"{files.admin_token} does not hold an admin token")
    store.set_admin_token_hash(pki.hash_secret(token))
    logger.info("admin token taken from %s", files.admin_token)


class Identity:
    """The coordinator's side of enrolment and authentication (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        store: Store,
        *,
        cert_days: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.files = tls_files(data_dir)
        self.ca = _load_ca(self.files)
        self.ca_pem = pki.cert_pem(self.ca.cert).decode()
        self.store = store
        _adopt_admin_token(self.files, store)
        self.cert_days = cert_days
        self._clock = clock

    # ------------------------------------------------------------ requests

    def authenticate(self, identity: tuple[str, str] | None) -> str:
        """The device id of a request whose TLS client certificate gave ``identity`` (id, serial).

        The TLS handshake already checked the chain to this CA and the validity
        period; this adds what only the store knows: revocation.

        Raises:
            ProtocolError: ``no_certificate`` or ``revoked``.
        """
        if identity is None:
            raise _refusal("no_certificate", "this endpoint needs a client certificate from enrolment")
        device_id, serial = identity
        if self.store.is_revoked(device_id, serial):
            raise _refusal("revoked", f"device {device_id}'s certificate is revoked or unknown")
        return device_id

    def check_admin(self, authorization: str | None) -> None:
        """Refuse unless ``authorization`` is ``Bearer <the admin token>``."""
        expected = self.store.admin_token_hash()
        scheme, _, token = (authorization or "").partition(" ")
        if expected is None or scheme.lower() != "bearer" or not token:
            raise _refusal("unauthorized", "admin endpoints need 'Authorization: Bearer <admin token>'")
        if not pki.constant_time_equal(pki.hash_secret(token.strip()), expected):
            raise _refusal("unauthorized", "the admin token is not valid")

    def enrol(self, request: EnrolRequest) -> EnrolReply:
        """Sign a device's CSR if its token allows it.

        Raises:
            ProtocolError: ``bad_csr``, ``too_large``, ``bad_token``,
                ``device_exists`` or ``revoked``.
        """
        now = self._clock()
        device_id = _csr_device_id(request.csr_pem.encode())
        token_hash = pki.hash_secret(request.token)
        # The token first: without a valid one, nothing is said about which ids exist.
        reason = self.store.token_refusal(token_hash=token_hash, device_id=device_id, now=now)
        if reason is not None:
            raise _refusal("bad_token", _TOKEN_DETAIL.get(reason, "the token is not valid"))
        bound = self.store.token_device(token_hash)
        if bound != device_id and self._has_active_certificate(device_id, now):
            # Taking over an enrolled id needs a token bound to that id: an
            # explicit admin decision (a lost or re-imaged device).
            raise _refusal(
                "device_exists",
                f"device {device_id} is already enrolled; enrolling it again "
                "needs a token created for it (fedge token create --device-id)",
            )
        rebind = bound == device_id
        if not rebind and any(
            d.device_id == device_id and d.revoked_at is not None for d in self.store.devices()
        ):
            # Checked before the token is spent: a refused enrolment costs no use.
            raise _refusal(
                "revoked", f"device {device_id} is revoked; enrolling it again needs a token created for it"
            )
        cert = self._sign(request.csr_pem.encode(), device_id, now)
        try:
            self.store.consume_token(token_hash=token_hash, device_id=device_id, now=now)
        except TokenError as e:
            raise _refusal("bad_token", _TOKEN_DETAIL.get(e.reason, "the token is not valid")) from None
        if rebind and self._has_active_certificate(device_id, now):
            # The id moves to a new key (a replaced or re-imaged device): the
            # old key's certificates must not keep working beside it.
            self.store.revoke_device(device_id, now=now)
        self.store.enrol_device(device_id, now=now, allow_revoked=rebind)
        return self._issue(cert, device_id, now)

    def renew(self, device_id: str, request: RenewRequest) -> EnrolReply:
        """A fresh certificate for an authenticated device (its CSR must name the same id)."""
        now = self._clock()
        if _csr_device_id(request.csr_pem.encode()) != device_id:
            raise _refusal("bad_csr", "a renewal CSR must name the device's own id")
        return self._issue(self._sign(request.csr_pem.encode(), device_id, now), device_id, now)

    def _sign(self, csr_pem: bytes, device_id: str, now: float) -> x509.Certificate:
        try:
            return pki.sign_device_csr(
                self.ca, csr_pem, device_id=device_id, valid_days=self.cert_days, now=_utc(now)
            )
        except pki.PKIError as e:
            raise _refusal("too_large" if e.reason == "too_large" else "bad_csr", str(e)) from None

    def _issue(self, cert: x509.Certificate, device_id: str, now: float) -> EnrolReply:
        not_after = cert.not_valid_after_utc.timestamp()
        self.store.record_certificate(
            serial=pki.serial_hex(cert),
            device_id=device_id,
            fingerprint=pki.fingerprint(cert),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=not_after,
            issued_at=now,
        )
        logger.info(
            "issued a certificate to device %s, valid until %s",
            device_id,
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return EnrolReply(
            device_id=device_id,
            certificate_pem=pki.cert_pem(cert).decode(),
            ca_pem=self.ca_pem,
            not_after=not_after,
        )

    def _has_active_certificate(self, device_id: str, now: float) -> bool:
        return any(c.revoked_at is None and c.not_after > now for c in self.store.certificates(device_id))

    def create_token(self, request: TokenRequest) -> TokenReply:
        return create_token(
            self.store,
            expires_s=request.expires_s,
            uses=request.uses,
            device_id=request.device_id,
            now=self._clock(),
        )


_TOKEN_DETAIL = {
    "unknown_token": "the enrolment token is not known",
    "expired_token": "the enrolment token has expired",
    "used_token": "the enrolment token has been used up",
    "wrong_device": "the enrolment token was created for another device id",
}


def _csr_device_id(csr_pem: bytes) -> str:
    """The device id a CSR asks for (its subject CN), before anything else is checked."""
    if len(csr_pem) > pki.MAX_CSR_BYTES:
        raise _refusal("too_large", f"a CSR of {len(csr_pem)} bytes exceeds {pki.MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as e:
        raise _refusal("bad_csr", f"not a PEM certificate signing request ({e})") from None
    value = names[0].value if names else None
    if not isinstance(value, str) or not pki.DEVICE_ID_PATTERN.fullmatch(value):
        raise _refusal("bad_csr", "the CSR's subject must be CN=<device id> (letters, digits, '.', '_', '-')")
    return value

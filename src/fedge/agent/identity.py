"""The device's identity: its key, its certificate from the fedge CA, enrolment and renewal.

The key is generated here, on the device, and written with mode 0600 to
``state_dir/device.key``; it never leaves the device. The first time, the
agent sends a CSR (subject ``CN=<device id>``) with the one-time enrolment
token over TLS, trusting only the CA the operator gave it (``ca_cert``) or
the CA whose SHA-256 fingerprint it was given (``ca_fingerprint``, checked
against the CA certificate the coordinator serves). The certificate comes
back and is kept in ``state_dir/device.crt``; from then on every request is
mutual TLS with it. Once two thirds of its validity have passed, the next
request first renews it (a CSR for the same key over mutual TLS) and
reconnects with the new one: a device that runs keeps a valid certificate
by itself.

:class:`MutualTlsTransport` wraps all of this behind the one-method
:class:`~fedge.transport.base.Transport`, so the agent loop is the same with
and without TLS. No key, token or certificate body is ever logged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from fedge.agent.config import AgentConfig
from fedge.errors import ConfigError, ProtocolError, TransportError
from fedge.transport.base import Response, Transport
from fedge.wire import PROTOCOL_VERSION, EnrolReply, EnrolRequest, RenewRequest, parse_message

__all__ = ["DeviceIdentity", "MutualTlsTransport"]

logger = logging.getLogger(__name__)

# A failed renewal is retried at most this often (the current certificate still works).
_RENEW_RETRY_S = 60.0


class DeviceIdentity:
    """The files of one device's identity under ``state_dir``.

    ``device.crt.json`` keeps the certificate's id and validity next to it,
    so that deciding when to renew needs no certificate parsing (and no
    ``cryptography``) in the long-running agent.
    """

    def __init__(self, state_dir: Path, device_id: str) -> None:
        self.device_id = device_id
        self.key_file = state_dir / "device.key"
        self.cert_file = state_dir / "device.crt"
        self.info_file = state_dir / "device.crt.json"
        self.ca_file = state_dir / "ca.crt"
        self._cached_info: dict[str, float | str] | None = None

    def ensure_key(self) -> None:
        """Generate the device key (mode 0600) unless it exists."""
        if not self.key_file.exists():
            self.csr()  # the keytool makes the key with its first CSR
            logger.info("generated this device's private key in %s (mode 0600)", self.key_file)

    def ensure_ca(self, config: AgentConfig) -> None:
        """Put the trusted CA certificate in place: given, kept from before, or fetched by its pin.

        Raises:
            ConfigError: no CA given and none kept; an unreadable CA file; a
                CA fetched by pin that does not match it.
            TransportError: the coordinator could not be reached to fetch it.
        """
        if config.ca_cert is not None:
            try:
                data = config.ca_cert.read_bytes()
            except OSError as e:
                raise ConfigError(f"ca_cert {config.ca_cert}: cannot read ({e.strerror})") from None
            if b"-----BEGIN CERTIFICATE-----" not in data:
                raise ConfigError(f"ca_cert {config.ca_cert}: not a PEM certificate")
            if not self.ca_file.exists() or self.ca_file.read_bytes() != data:
                _write_atomic(self.ca_file, data)
            return
        if self.ca_file.exists():
            return  # given before, or fetched by its pin and checked then
        if config.ca_fingerprint is None:
            raise ConfigError(
                "an https:// coordinator needs the CA to trust: give --ca-cert FILE or "
                "--ca-fingerprint SHA256 (printed by `fedge ca init`)"
            )
        parts = urlsplit(config.coordinator)
        pem = _keytool(
            "fetch-ca",
            "--host",
            parts.hostname or "",
            "--port",
            str(parts.port or 443),
            "--pin",
            config.ca_fingerprint,
            "--timeout",
            str(config.request_timeout_s),
            refused="the coordinator's CA does not match ca_fingerprint",
        )
        _write_atomic(self.ca_file, pem.encode())
        logger.info("fetched the coordinator's CA, matching the pinned fingerprint")

    def _info(self) -> dict[str, float | str] | None:
        # Read once and kept: this is asked on every request, and only save() changes it.
        if self._cached_info is None:
            self._cached_info = self._read_info()
        return self._cached_info

    def _read_info(self) -> dict[str, float | str] | None:
        try:
            info = json.loads(self.info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if not self.cert_file.exists():
                return None
            # A certificate without its note (written by an older agent): read it once.
            info = json.loads(_keytool("inspect", "--cert", str(self.cert_file), refused="device.crt"))
            _write_atomic(self.info_file, json.dumps(info).encode())
        return info if isinstance(info, dict) and info.get("device_id") == self.device_id else None

    def certificate_not_after(self) -> dt.datetime | None:
        """When the kept certificate expires (``None``: none kept, or not for this device)."""
        info = self._info()
        if info is None or not self.cert_file.exists():
            return None
        return dt.datetime.fromtimestamp(float(info["not_after"]), dt.UTC)

    def needs_renewal(self, now: dt.datetime, fraction: float = 2 / 3) -> bool:
        """True once ``fraction`` of the certificate's validity has passed (or it is unreadable)."""
        info = self._info()
        if info is None:
            return True
        start, end = float(info["not_before"]), float(info["not_after"])
        return now.timestamp() >= start + fraction * (end - start)

    def csr(self) -> str:
        """A CSR for this device's key (made on the first call, mode 0600)."""
        return _keytool(
            "csr", "--key", str(self.key_file), "--device-id", self.device_id, refused="device key"
        )

    def save(self, reply: EnrolReply) -> None:
        if reply.device_id != self.device_id:
            raise ProtocolError(
                "bad_payload",
                f"the coordinator issued a certificate for {reply.device_id!r}, not {self.device_id!r}",
            )
        pending = self.cert_file.with_name(".device.crt.new")
        _write_atomic(pending, reply.certificate_pem.encode())
        try:
            info = json.loads(_keytool("inspect", "--cert", str(pending), refused="the issued certificate"))
        except ConfigError as e:
            raise ProtocolError("bad_payload", str(e)) from None
        if info.get("device_id") != self.device_id:
            raise ProtocolError("bad_payload", "the issued certificate names another device")
        pending.replace(self.cert_file)
        _write_atomic(self.info_file, json.dumps(info).encode())
        self._cached_info = info


def _keytool(*args: str, refused: str) -> str:
    """Run ``python -m fedge.agent.keytool ARGS`` and return its output.

    Raises:
        ConfigError: it refused (a pin that does not match, an unreadable file).
        TransportError: it could not reach the coordinator.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.agent.keytool", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode == 0:
        return proc.stdout
    message = (
        proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
    )
    if proc.returncode == 4:
        raise TransportError(message)
    raise ConfigError(f"{refused}: {message}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class MutualTlsTransport:
    """An HTTPS transport that enrols the device first and renews its certificate in time.

    Args:
        identity: the device's files.
        make_transport: builds the underlying transport from ``(ca_file,
            cert_file, key_file)``; ``cert_file``/``key_file`` are ``None``
            before enrolment.
        config: the agent's settings (where its CA comes from).
        token: the enrolment token (needed only while not enrolled).
        clock: wall-clock seconds (for renewal).
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        make_transport: Callable[[Path, Path | None, Path | None], Transport],
        *,
        config: AgentConfig,
        token: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self._make = make_transport
        self._config = config
        self._token = token
        self._clock = clock
        self._inner: Transport | None = None
        self._ca_ready = False
        self._next_renewal_try = 0.0

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout_s: float,
    ) -> Response:
        now = self._clock()
        # The first request fetches a pinned CA and enrols: both may meet an
        # unreachable coordinator, and then retry with the agent's backoff.
        if not self._ca_ready:
            self.identity.ensure_ca(self._config)
            self._ca_ready = True
        if self.identity.certificate_not_after() is None:
            self._enrol(timeout_s)
        elif now >= self._next_renewal_try and self.identity.needs_renewal(
            dt.datetime.fromtimestamp(now, dt.UTC)
        ):
            self._renew(timeout_s)
        return self._connected().request(method, path, headers=headers, content=content, timeout_s=timeout_s)

    def close(self) -> None:
        if self._inner is not None:
            _close(self._inner)
            self._inner = None

    def _connected(self) -> Transport:
        if self._inner is None:
            i = self.identity
            self._inner = self._make(i.ca_file, i.cert_file, i.key_file)
        return self._inner

    def _enrol(self, timeout_s: float) -> None:
        if self._token is None:
            raise ConfigError(
                "this device is not enrolled yet: give an enrolment token (--token or token_file; "
                "`fedge token create` makes one)"
            )
        body = EnrolRequest(token=self._token, csr_pem=self.identity.csr()).model_dump_json().encode()
        enrolment = self._make(self.identity.ca_file, None, None)
        try:
            response = enrolment.request(
                "POST", "/v1/enrol", headers=_JSON, content=body, timeout_s=timeout_s
            )
        finally:
            _close(enrolment)
        if response.status != 200:
            error = _error_of(response)
            # A refused enrolment will not succeed by retrying: the operator must act.
            raise ConfigError(f"enrolment refused ({error}); create a new token with `fedge token create`")
        self.identity.save(parse_message(EnrolReply, response.body))
        self._token = None  # used up: never kept in memory longer than needed
        self.close()
        logger.info(
            "enrolled as device %s; certificate in %s", self.identity.device_id, self.identity.cert_file,
            extra={"event": "enrolment"},
        )

    def _renew(self, timeout_s: float) -> None:
        self._next_renewal_try = self._clock() + _RENEW_RETRY_S
        body = RenewRequest(csr_pem=self.identity.csr()).model_dump_json().encode()
        try:
            response = self._connected().request(
                "POST", "/v1/renew", headers=_JSON, content=body, timeout_s=timeout_s
            )
        except Exception as e:  # the current certificate still works; try again later
            logger.warning("certificate renewal failed (%s); retrying in %.0f s", e, _RENEW_RETRY_S)
            return
        if response.status != 200:
            logger.warning(
                "certificate renewal refused (%s); retrying in %.0f s", _error_of(response), _RENEW_RETRY_S
            )
            return
        self.identity.save(parse_message(EnrolReply, response.body))
        self.close()  # reconnect with the new certificate
        logger.info("renewed this device's certificate", extra={"event": "renewal"})


_JSON = {"content-type": "application/json", "x-fedge-protocol": str(PROTOCOL_VERSION)}


def _error_of(response: Response) -> str:
    try:
        body = json.loads(response.body)
        return f"{body['error']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status}"


def _close(transport: Transport) -> None:
    close = getattr(transport, "close", None)
    if callable(close):
        close()

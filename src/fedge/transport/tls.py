"""TLS contexts for the coordinator and the agent, from the stdlib ``ssl`` module alone.

Kept apart from :mod:`fedge.pki` (which needs ``cryptography`` to make keys
and certificates) so that a running agent, which only needs to speak mutual
TLS with files it already has, never loads ``cryptography``: on a small
device that is ~9 MB of memory.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_ssl_context", "server_ssl_context"]


def server_ssl_context(*, cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The coordinator's TLS context: its certificate, and client certificates verified against the CA.

    Client certificates are optional at the TLS layer (``CERT_OPTIONAL``)
    because enrolment comes before a device has one; a certificate that is
    presented must verify, and the application requires one on every device
    endpoint.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_ssl_context(
    *, ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A device's TLS context: the server verified against ``ca_file`` alone, and its own certificate.

    With ``ca_file`` only that CA is trusted, not the system store (a public
    CA must not be able to impersonate the coordinator); without it, the
    system store is used.
    """
    if key_file is not None and cert_file is None:
        raise ValueError("key_file given without cert_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context

"""The production transport: HTTP(S) to the coordinator over a pooled httpx client.

httpx is imported when a transport is built, not when this module is: the
``httpx`` package's ``__init__`` pulls in its optional command-line tool
(rich, click, pygments) whenever those happen to be installed, and the agent's
import graph must stay small (DESIGN.md, "Dependencies").

Every failure that leaves no response (refused or reset connection, DNS
failure, TLS failure, timeout) becomes one :class:`~fedge.errors.TransportError`
with a one-line message; every response, whatever its status, is returned.
Bodies are read as a stream and refused past ``max_body_bytes``, so a
misbehaving server cannot make a small device buffer gigabytes.

With a :class:`~fedge.transport.meter.WireMeter` the client's connections
are made by :mod:`fedge.transport.meter`, which counts every byte at the
socket (TLS records included); without one, httpx's own transport is used.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fedge import __version__
from fedge.errors import ConfigError, ProtocolError, TransportError
from fedge.transport.base import Response

if TYPE_CHECKING:
    import httpx

    from fedge.transport.meter import WireMeter

__all__ = ["DEFAULT_MAX_BODY_BYTES", "HttpTransport"]

#: The default bound on a response body: the agent's payload limit plus room for headers.
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024 + 1024 * 1024


class HttpTransport:
    """A :class:`~fedge.transport.base.Transport` over one pooled ``httpx.Client``.

    Close it (or use it as a context manager) to release its connections.

    Args:
        base_url: the coordinator's URL, ``http://`` or ``https://``; request
            paths are appended to it (a path prefix in it is kept).
        verify: TLS server verification: ``True`` (httpx's default CAs),
            ``False``, a CA bundle file or directory, or an ``ssl.SSLContext``.
        cert: the client certificate for mutual TLS (a PEM path holding the
            certificate and key, or a ``(cert, key)`` pair of paths), or
            ``None``. With ``verify=True`` it is presented over a context that
            trusts the system's CAs.
        max_body_bytes: the largest response body accepted.
        max_connections: the connection pool's size.
        trust_env: honour ``HTTPS_PROXY``/``NO_PROXY`` and ``SSL_CERT_FILE``
            from the environment (a device behind a proxy needs it).
        meter: counts every byte the transport's sockets send and receive,
            and its connections; ``None`` counts nothing.

    Raises:
        ValueError: ``max_body_bytes`` or ``max_connections`` is not positive.
        ConfigError: a CA bundle or client certificate cannot be loaded, or (with a
            ``meter``) the environment names a proxy that cannot be used.
    """

    def __init__(
        self,
        base_url: str,
        *,
        verify: bool | str | ssl.SSLContext = True,
        cert: str | tuple[str, str] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_connections: int = 4,
        trust_env: bool = True,
        meter: WireMeter | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be positive, got {max_connections}")
        import httpx

        self._httpx = httpx
        self._max_body_bytes = max_body_bytes
        if base_url.startswith("http://") and verify is True and cert is None:
            # No TLS to verify; skipping the default CA bundle saves ~2 MB of
            # RSS on a small device (redirects, which could lead to https, are off).
            verify = False
        context = _tls_context(verify, cert)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        transport = None
        if meter is not None:
            from fedge.transport.meter import metered_transport

            ssl_context = (
                context if isinstance(context, ssl.SSLContext)
                else httpx.create_ssl_context(verify=context, trust_env=trust_env)
            )
            transport = metered_transport(
                meter, ssl_context=ssl_context, limits=limits,
                proxy=_environment_proxy(base_url) if trust_env else None,
            )
        self._client: httpx.Client = httpx.Client(
            base_url=base_url,
            verify=context,
            transport=transport,
            limits=limits,
            headers={"user-agent": f"fedge-agent/{__version__}"},
            follow_redirects=False,
            trust_env=trust_env,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout_s: float,
    ) -> Response:
        """Send one request and read the whole response.

        Args:
            method: the HTTP method.
            path: the path under the base URL.
            headers: request headers.
            content: the request body, or ``None``.
            timeout_s: the bound on connecting, and on each read and write.

        Returns:
            The response, for every status.

        Raises:
            TransportError: no response came back (the message is one line).
            ProtocolError: ``too_large``: the body exceeds ``max_body_bytes``.
        """
        httpx = self._httpx
        try:
            with self._client.stream(
                method, path, headers=dict(headers), content=content, timeout=httpx.Timeout(timeout_s)
            ) as r:
                body = self._read_body(r, method, path)
                return Response(
                    status=r.status_code,
                    headers={k.lower(): v for k, v in r.headers.items()},
                    body=body,
                )
        except httpx.TransportError as e:
            raise TransportError(f"{method} {path}: {_describe(e)}") from e

    def close(self) -> None:
        """Close the pooled connections; the transport cannot be used afterwards."""
        self._client.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_body(self, r: httpx.Response, method: str, path: str) -> bytes:
        declared = r.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_bytes:
            raise ProtocolError(
                "too_large",
                f"{method} {path}: response of {declared} bytes exceeds the limit of {self._max_body_bytes}",
                413,
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in r.iter_bytes():
            size += len(chunk)
            if size > self._max_body_bytes:
                raise ProtocolError(
                    "too_large",
                    f"{method} {path}: response exceeds the limit of {self._max_body_bytes} bytes",
                    413,
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _tls_context(
    verify: bool | str | ssl.SSLContext, cert: str | tuple[str, str] | None
) -> bool | ssl.SSLContext:
    """What to hand httpx as ``verify``: paths and client certificates become an SSL context.

    httpx 0.28 deprecates ``verify=<path>`` and ``cert=``; building the context
    here works the same across httpx versions.
    """
    if cert is None and not isinstance(verify, str):
        return verify
    try:
        if isinstance(verify, ssl.SSLContext):
            context = verify
        elif verify is False:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif verify is True:
            context = ssl.create_default_context()
        elif os.path.isdir(verify):
            context = ssl.create_default_context(capath=verify)
        else:
            context = ssl.create_default_context(cafile=verify)
        if cert is not None:
            context.load_cert_chain(*((cert,) if isinstance(cert, str) else cert))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS setup failed (CA {verify!r}, certificate {cert!r}): {e}") from e
    return context


def _environment_proxy(base_url: str) -> str | None:
    """The proxy the environment names for ``base_url`` (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``).

    httpx applies these itself only to the transports it builds; a metered
    transport is ours, so the same variables are read here, with the stdlib's rules.

    Raises:
        ConfigError: the proxy's scheme is not http, https, socks5 or socks5h,
            or a SOCKS proxy is named and socksio is not installed.
    """
    url = urlsplit(base_url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme.lower()) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.hostname or ""):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy  # curl's reading of a bare host:port
    scheme = urlsplit(proxy).scheme.lower()
    if scheme not in ("http", "https", "socks5", "socks5h"):
        raise ConfigError(f"proxy {proxy!r} from the environment: scheme must be http, https or socks5")
    if scheme.startswith("socks") and importlib.util.find_spec("socksio") is None:
        raise ConfigError(f"proxy {proxy!r} from the environment needs the socksio package")
    return proxy


def _describe(e: Exception) -> str:
    """One line naming the failure: the httpx class (ConnectError, ReadTimeout...) and its text."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__} ({text})" if text else type(e).__name__

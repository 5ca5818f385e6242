"""The transport seam: one request method between the agent and the coordinator.

Everything above this seam (the agent loop, the coordinator client) speaks
paths, headers and bytes; everything below it moves them. Production uses
:class:`~fedge.transport.http.HttpTransport` (httpx); the simulator and the
tests use :class:`~fedge.transport.local.LocalTransport`, which hands the
request to a Python callable. The shape follows httpx's own
``BaseTransport``: a transport answers every HTTP status with a
:class:`Response` and raises only when no answer came back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Request", "Response", "Transport"]


@dataclass(frozen=True)
class Request:
    """One request as a transport carries it (what a local handler receives).

    Attributes:
        method: the HTTP method, upper case.
        path: the path under the coordinator's base URL, e.g. ``/v1/check-in``.
        headers: request headers, keys lower case.
        content: the body, or ``None`` for none.
    """

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None


@dataclass(frozen=True)
class Response:
    """What the other side answered, whatever the status.

    Attributes:
        status: the HTTP status code.
        headers: response headers, keys lower case.
        body: the whole body.
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class Transport(Protocol):
    """Carries one request to the coordinator and brings back its response."""

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout_s: float,
    ) -> Response:
        """Send ``method path`` with ``headers`` and ``content``; wait at most ``timeout_s``.

        Args:
            method: the HTTP method (``GET``, ``POST``).
            path: the path under the coordinator's base URL.
            headers: request headers.
            content: the request body, or ``None``.
            timeout_s: the bound on connecting and on each read and write.

        Returns:
            The response, for every status (a 4xx or 5xx is not an error here).

        Raises:
            TransportError: nothing came back: connection refused or reset,
                DNS failure, TLS failure, timeout.
            ProtocolError: ``too_large`` when the body exceeds what the
                transport was built to accept.
        """
        ...

"""An in-process transport: requests go to a Python callable, not a socket.

The simulator and the tests put a coordinator (or a fake of one) behind the
same :class:`~fedge.transport.base.Transport` seam the agent uses in
production, so the agent's code path is the real one and only the wire is
missing. Header keys are lower-cased both ways, as HTTP would have them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedge.transport.base import Request, Response

__all__ = ["Handler", "LocalTransport"]

#: What serves a local transport: one request in, one response out. It may
#: raise :class:`~fedge.errors.TransportError` to act out a network failure.
Handler = Callable[[Request], Response]


class LocalTransport:
    """A :class:`~fedge.transport.base.Transport` that calls ``handler`` in this thread.

    Args:
        handler: serves each request.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout_s: float,
    ) -> Response:
        """Hand the request to the handler; ``timeout_s`` is not enforced in process."""
        del timeout_s
        response = self._handler(
            Request(method.upper(), path, {k.lower(): v for k, v in headers.items()}, content)
        )
        return Response(
            response.status, {k.lower(): v for k, v in response.headers.items()}, response.body
        )

"""Transports: how the agent's requests reach the coordinator.

* :mod:`fedge.transport.base`: the one-method :class:`Transport` protocol and
  the :class:`Request` and :class:`Response` values.
* :mod:`fedge.transport.http`: :class:`~fedge.transport.http.HttpTransport`,
  HTTP(S) over httpx, for real devices.
* :mod:`fedge.transport.local`: :class:`LocalTransport`, which calls a Python
  handler in process, for the simulator and the tests.

Importing this package imports neither httpx nor any server framework.
"""

from __future__ import annotations

from fedge.transport.base import Request, Response, Transport
from fedge.transport.local import Handler, LocalTransport

__all__ = ["Handler", "LocalTransport", "Request", "Response", "Transport"]

"""The coordinator: configuration, the round driver, the HTTP API and the server process.

* :mod:`fedge.coordinator.config`: :class:`CoordinatorConfig` from ``coordinator.toml``.
* :mod:`fedge.coordinator.service`: :class:`Coordinator`, the rounds over the network.
* :mod:`fedge.coordinator.app`: the FastAPI routes.
* :mod:`fedge.coordinator.server`: :func:`serve`, uvicorn on a pre-bound socket.

Importing this package imports neither FastAPI nor uvicorn; the submodules do.
"""

from __future__ import annotations

from fedge.coordinator.config import CoordinatorConfig, load_coordinator_config

__all__ = ["CoordinatorConfig", "load_coordinator_config"]

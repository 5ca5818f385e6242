"""The device agent: the long-running process on a device that trains for the coordinator.

* :mod:`fedge.agent.config`: :class:`AgentConfig` and :func:`load_agent_config`
  (TOML file plus command-line overrides).
* :mod:`fedge.agent.loop`: :class:`Agent` (the check-in / train / upload loop),
  :func:`run_agent` (the process around it: signals, the HTTP transport) and
  :func:`backoff_delay`.
* :mod:`fedge.agent.client`: the coordinator's ``/v1`` routes over a transport.
* :mod:`fedge.agent.state`: the state directory's lock and the device id.

Importing this package needs numpy, pydantic and the packages :mod:`fedge.wire`
needs; never torch, FastAPI or matplotlib (DESIGN.md, "Dependencies").
"""

from __future__ import annotations

from fedge.agent.config import LOG_LEVELS, AgentConfig, load_agent_config
from fedge.agent.loop import Agent, backoff_delay, run_agent, training_rng

__all__ = [
    "LOG_LEVELS",
    "Agent",
    "AgentConfig",
    "backoff_delay",
    "load_agent_config",
    "run_agent",
    "training_rng",
]

"""The simulator: the real round logic over virtual devices on one machine.

    >>> from fedge.sim import simulate
    >>> result = simulate(rounds=5)          # doctest: +SKIP
    >>> result.metrics["accuracy"]           # doctest: +SKIP

:class:`SimConfig` holds every setting; :class:`Simulation` builds a run (all
input checks happen there) and runs it; :class:`RunWriter` writes an output
folder. Backends: ``inline`` (one process) and ``processes`` (every core).
"""

from __future__ import annotations

from fedge.sim.config import SimConfig
from fedge.sim.engine import RoundRecord, SimResult, Simulation, simulate

__all__ = ["RoundRecord", "SimConfig", "SimResult", "Simulation", "simulate"]

"""fedge: privacy-preserving federated learning for fleets of Linux edge devices.

The package is layered as ``../shared/DESIGN.md`` draws it: pure modules
(:mod:`fedge.params`, :mod:`fedge.tasks`, :mod:`fedge.strategies`,
:mod:`fedge.rounds`) hold the math and the round logic; I/O lives in
:mod:`fedge.data` loaders, :mod:`fedge.sim` and :mod:`fedge.cli`.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

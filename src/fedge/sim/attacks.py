"""Simulated attacks: a fraction of the virtual devices are malicious, so a defence can be measured.

``fedge simulate --attack SPEC --malicious FRACTION``. The attacks are the
usual yardsticks of the robust-aggregation papers:

* ``sign-flip:SCALE``: send ``-SCALE`` times the honest update (pushes the
  model uphill; Blanchard et al. 2017 and El Mhamdi et al. 2018 use such
  "omniscient" reversed gradients).
* ``scale:FACTOR``: send ``FACTOR`` times the honest update (boosting, as in
  model-replacement attacks; Bagdasaryan et al. 2020).
* ``gaussian:SIGMA``: send noise, every value drawn from N(0, SIGMA^2),
  instead of an update (the Gaussian attack of Blanchard et al. 2017).
* ``label-flip``: train honestly on poisoned data: a malicious device's
  labels are permuted ``c -> C - 1 - c`` when the data is loaded (Biggio et
  al. 2012; Fang et al. 2020).

Which devices are malicious is drawn once per run from the seed: ``round(
FRACTION * devices)`` of them, the same whichever backend runs the round. A
malicious device stays malicious in every round it is invited to. The
update attacks are applied in the device runner right after the delta is
computed (before any clipping, noise, compression or masking, as a
compromised device would), with the device's own generator, so they work
the same with the ``inline`` and ``processes`` backends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from fedge.data.dataset import Dataset, FederatedData
from fedge.errors import ConfigError
from fedge.params import Array, Params

__all__ = [
    "ATTACK_NAMES",
    "Attack",
    "AttackSpec",
    "choose_malicious",
    "flip_labels",
    "parse_attack",
]

#: The ``--attack`` values, as shown to users.
ATTACK_NAMES = ("sign-flip:SCALE", "scale:FACTOR", "gaussian:SIGMA", "label-flip")

_ARGUMENT = {"sign-flip": "SCALE", "scale": "FACTOR", "gaussian": "SIGMA"}

# The stream malicious devices are drawn from: default_rng([seed, _STREAM]).
# Distinct from the data streams (1-3) and the engine's (1-2 under another
# first key), so that adding an attack changes nothing else in a run.
_STREAM = 0xA77AC


@dataclass(frozen=True)
class AttackSpec:
    """A parsed ``--attack``: its kind and its number (None for ``label-flip``)."""

    kind: str
    value: float | None = None

    @property
    def text(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    @property
    def changes_data(self) -> bool:
        """Whether the attack poisons the data (at load) rather than the update."""
        return self.kind == "label-flip"


def parse_attack(spec: str) -> AttackSpec:
    """Parse ``sign-flip:SCALE``, ``scale:FACTOR``, ``gaussian:SIGMA`` or ``label-flip``.

    Raises:
        ConfigError: an unknown attack, a missing, extra or non-numeric
            argument, or a value out of range (every number must be a
            positive finite number).
    """
    kind, sep, arg = spec.partition(":")
    known = ", ".join(ATTACK_NAMES)
    if kind == "label-flip":
        if sep:
            raise ConfigError(f"--attack label-flip takes no ':ARG', got {spec!r}")
        return AttackSpec("label-flip")
    if kind not in _ARGUMENT:
        raise ConfigError(f"unknown attack {spec!r}; known: {known}")
    name = _ARGUMENT[kind]
    if not sep or not arg:
        raise ConfigError(f"--attack {kind} needs its {name}: {kind}:{name}")
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"--attack {spec!r}: {name} must be a number, got {arg!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--attack {spec!r}: {name} must be a positive finite number, got {arg}")
    return AttackSpec(kind, value)


def choose_malicious(num_devices: int, fraction: float, seed: int) -> frozenset[int]:
    """The ``round(fraction * num_devices)`` malicious devices, drawn reproducibly from ``seed``.

    Raises:
        ConfigError: the fraction is outside (0, 1), or rounds to no device
            or to every device.
    """
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise ConfigError(f"--malicious must be a fraction in (0, 1), got {fraction}")
    count = math.floor(fraction * num_devices + 0.5)
    if count == 0:
        raise ConfigError(
            f"--malicious {fraction:g} of {num_devices} devices makes no device malicious; "
            f"use at least {1 / num_devices:.3g}"
        )
    if count == num_devices:
        raise ConfigError(
            f"--malicious {fraction:g} of {num_devices} devices leaves no honest device"
        )
    rng = np.random.default_rng([seed, _STREAM])
    return frozenset(int(d) for d in rng.permutation(num_devices)[:count])


@dataclass(frozen=True)
class Attack:
    """An attack and the devices that carry it out; picklable, for worker processes."""

    spec: AttackSpec
    malicious: frozenset[int]

    def apply(
        self, device_id: int, delta: Mapping[str, Array], rng: np.random.Generator
    ) -> Params:
        """What device ``device_id`` sends instead of ``delta`` (``delta`` itself if honest).

        ``rng`` is the device's own generator for the round, so the noise of
        a Gaussian attack does not depend on which worker runs the device.
        """
        if device_id not in self.malicious or self.spec.changes_data:
            return dict(delta)
        kind, value = self.spec.kind, float(self.spec.value or 0.0)
        if kind == "gaussian":
            return {k: rng.normal(0.0, value, v.shape).astype(v.dtype) for k, v in delta.items()}
        factor = -value if kind == "sign-flip" else value
        return {k: v * v.dtype.type(factor) for k, v in delta.items()}


def flip_labels(data: FederatedData, devices: frozenset[int]) -> FederatedData:
    """``data`` with the labels of ``devices`` permuted ``c -> C - 1 - c`` (the test set untouched)."""
    top = data.spec.num_classes - 1
    poisoned = tuple(
        Dataset(x=d.x, y=(top - d.y).astype(np.int64)) if i in devices else d
        for i, d in enumerate(data.devices)
    )
    return replace(data, devices=poisoned)

"""FedAvg and the adaptive federated optimizers, as one strategy over server optimizers.

The server treats the round's weighted mean delta as a pseudo-gradient and
takes one optimizer step with it (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2). FedAvg (McMahan et al. 2017) is that
step with plain SGD at server learning rate 1; FedAvgM adds server momentum
(Hsu et al. 2019); FedAdagrad, FedAdam and FedYogi swap in the adaptive
rules. FedProx (Li et al., MLSys 2020) is FedAvg on the server with a
proximal term on the devices. So there is one strategy class and a server
optimizer per rule, never a copy of FedAvg per variant.

Following Reddi et al., the adaptive rules use no bias correction and start
the second moment at ``tau ** 2``; ``tau`` bounds the per-coordinate step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from fedge import params as P
from fedge.params import Array, Params
from fedge.strategies.base import Aggregate, ServerState, WeightedMean

__all__ = [
    "FedOpt",
    "ServerOptimizer",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedyogi",
]

Slots = Mapping[str, Params]


class ServerOptimizer(Protocol):
    """A pure optimizer over params: ``init`` makes its slots, ``step`` applies a pseudo-gradient."""

    def init(self, params: Params) -> dict[str, Params]: ...

    def step(self, params: Params, slots: Slots, delta: Params) -> tuple[Params, dict[str, Params]]:
        """New params and slots after ascending along ``delta`` (the mean device delta)."""
        ...


def _positive(name: str, value: float) -> float:
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _unit_interval(name: str, value: float) -> float:
    if not (np.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _SGD:
    """``x += lr * m`` with ``m = momentum * m + delta`` (momentum 0: plain FedAvg)."""

    lr: float
    momentum: float = 0.0

    def init(self, params: Params) -> dict[str, Params]:
        return {"momentum": P.zeros_like(params)} if self.momentum else {}

    def step(self, params: Params, slots: Slots, delta: Params) -> tuple[Params, dict[str, Params]]:
        # Cast back so a float64 delta never silently widens float32 params.
        if not self.momentum:
            return {
                k: (x + self.lr * delta[k]).astype(x.dtype, copy=False) for k, x in params.items()
            }, {}
        m: Params = {
            k: (self.momentum * m0 + delta[k]).astype(m0.dtype, copy=False)
            for k, m0 in slots["momentum"].items()
        }
        return {
            k: (x + self.lr * m[k]).astype(x.dtype, copy=False) for k, x in params.items()
        }, {"momentum": m}


# The three adaptive rules differ only in how the second moment v moves.
_SecondMoment = Callable[[Array, Array, float], Array]


def _adagrad_v(v: Array, d2: Array, beta2: float) -> Array:
    return v + d2


def _adam_v(v: Array, d2: Array, beta2: float) -> Array:
    return beta2 * v + (1 - beta2) * d2


def _yogi_v(v: Array, d2: Array, beta2: float) -> Array:
    # Yogi (Zaheer et al. 2018): additive, sign-controlled update of v, which
    # grows v more slowly than Adam when gradients are sparse or noisy.
    return v - (1 - beta2) * d2 * np.sign(v - d2)


@dataclass(frozen=True)
class _Adaptive:
    lr: float
    beta1: float
    beta2: float
    tau: float
    second_moment: _SecondMoment

    def init(self, params: Params) -> dict[str, Params]:
        return {
            "m": P.zeros_like(params),
            "v": {k: np.full_like(x, self.tau**2) for k, x in params.items()},
        }

    def step(self, params: Params, slots: Slots, delta: Params) -> tuple[Params, dict[str, Params]]:
        m_new: Params = {}
        v_new: Params = {}
        out: Params = {}
        for k, x in params.items():
            d = delta[k]
            m = self.beta1 * slots["m"][k] + (1 - self.beta1) * d
            v = self.second_moment(slots["v"][k], d * d, self.beta2)
            m_new[k] = m.astype(x.dtype, copy=False)
            v_new[k] = v.astype(x.dtype, copy=False)
            out[k] = (x + self.lr * m / (np.sqrt(v) + self.tau)).astype(x.dtype, copy=False)
        return out, {"m": m_new, "v": v_new}


@dataclass(frozen=True)
class FedOpt:
    """A strategy: example-weighted mean of deltas, then one server-optimizer step.

    It needs only the (weighted) sum of updates, so it aggregates in O(model)
    memory and works on the sum that secure aggregation reveals.
    """

    name: str
    optimizer: ServerOptimizer
    device_mu: float = 0.0

    needs_every_update: ClassVar[bool] = False
    secagg_compatible: ClassVar[bool] = True

    def init(self, params: Params) -> ServerState:
        p = P.copy(params)
        return ServerState(params=p, opt_state=self.optimizer.init(p), round=0)

    def accumulator(self, template: Mapping[str, Array]) -> WeightedMean:
        return WeightedMean(template)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        P.check_same_structure(state.params, aggregate.delta)
        params, slots = self.optimizer.step(state.params, state.opt_state, aggregate.delta)
        return ServerState(params=params, opt_state=slots, round=state.round + 1)


def fedavg(*, server_lr: float = 1.0) -> FedOpt:
    """FedAvg (McMahan et al., AISTATS 2017): the example-weighted mean of device models."""
    return FedOpt("fedavg", _SGD(lr=_positive("server_lr", server_lr)))


def fedavgm(*, server_lr: float = 1.0, momentum: float = 0.9) -> FedOpt:
    """FedAvgM (Hsu et al. 2019): FedAvg with server momentum."""
    return FedOpt(
        "fedavgm",
        _SGD(lr=_positive("server_lr", server_lr), momentum=_unit_interval("momentum", momentum)),
    )


def _adaptive(
    name: str, rule: _SecondMoment, server_lr: float, beta1: float, beta2: float, tau: float
) -> FedOpt:
    return FedOpt(
        name,
        _Adaptive(
            lr=_positive("server_lr", server_lr),
            beta1=_unit_interval("beta1", beta1),
            beta2=_unit_interval("beta2", beta2),
            tau=_positive("tau", tau),
            second_moment=rule,
        ),
    )


def fedadagrad(*, server_lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> FedOpt:
    """FedAdagrad (Reddi et al. 2021). Adagrad has no second-moment decay, so no ``beta2``."""
    return _adaptive("fedadagrad", _adagrad_v, server_lr, beta1, 0.0, tau)


def fedadam(
    *, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> FedOpt:
    """FedAdam (Reddi et al. 2021)."""
    return _adaptive("fedadam", _adam_v, server_lr, beta1, beta2, tau)


def fedyogi(
    *, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> FedOpt:
    """FedYogi (Reddi et al. 2021)."""
    return _adaptive("fedyogi", _yogi_v, server_lr, beta1, beta2, tau)


def fedprox(*, mu: float = 0.01, server_lr: float = 1.0) -> FedOpt:
    """FedProx (Li et al., MLSys 2020): FedAvg on the server, proximal term ``mu`` on devices."""
    if not (np.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    return FedOpt("fedprox", _SGD(lr=_positive("server_lr", server_lr)), device_mu=float(mu))

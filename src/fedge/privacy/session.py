"""One run's differential privacy: the mechanism per round, the ledger, the budget.

The simulator and the coordinator drive a :class:`PrivacySession` the same
way, round after round::

    session.check_budget()                 # refuse to start an over-budget round
    how = session.device_privacy()         # what each device does: clip (+ local noise)
    ...devices clip; updates are summed with weight 1...
    aggregate = session.release(round_id, aggregate, unclipped=k)   # central noise, fixed denominator
    entry = session.charge(round_id)       # ledger entry with epsilon after this round

A round that ends with no update releases nothing and leaves the clip
where it was (no count to learn from), but the caller may still charge it.

It holds no I/O: the caller stores the ledger entries (the coordinator in
the same transaction that completes the round) and hands them back with
:meth:`PrivacySession.restore` after a restart.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from fedge import params as P
from fedge.errors import ConfigError, PrivacyBudgetError
from fedge.privacy.accounting import (
    ACCOUNTANTS,
    Accountant,
    LedgerEntry,
    RoundEvent,
    calibrate_noise_multiplier,
)
from fedge.privacy.adaptive import AdaptiveClip, corrected_noise_multiplier
from fedge.privacy.distributed import DistributedGrid, DistributedPlan, plan_grid, share_stddev
from fedge.privacy.mechanisms import DevicePrivacy, noise_generator, noised_mean
from fedge.strategies.base import Aggregate

__all__ = ["MODES", "LedgerEntry", "PrivacyConfig", "PrivacySession"]

MODES = ("central", "distributed", "local")
DEFAULT_DELTA = 1e-5
DEFAULT_CLIP_NORM = 1.0
# Keys of the session's noise streams (with a seed, noise_generator(seed, round, key)).
_CENTRAL_KEY, _COUNT_KEY = 1 << 40, (1 << 40) + 1


@dataclass(frozen=True)
class PrivacyConfig:
    """The DP settings of a simulation or a federation.

    Attributes:
        mode: ``central`` (the trusted coordinator noises the sum), ``local``
            (every device noises its own update) or ``distributed`` (devices
            add shares of the noise under secure aggregation).
        clip_norm: the L2 bound on an update, or ``"adaptive"`` (Andrew et
            al. 2021, starting from 0.1).
        noise_multiplier: noise stddev over the clip norm; exclusive with
            ``target_epsilon`` (then calibrated for the planned rounds).
        target_epsilon: the epsilon the planned rounds should reach.
        delta: the delta epsilon is reported at.
        budget: the epsilon no run may exceed (defaults to ``target_epsilon``);
            ``None`` for no limit.
        accountant: ``rdp`` (default) or ``pld``.
    """

    mode: str = "central"
    clip_norm: float | str = DEFAULT_CLIP_NORM
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    budget: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--dp must be one of {', '.join(MODES)}, got {self.mode!r}")
        clip = self.clip_norm
        if isinstance(clip, str) and clip != "adaptive":
            try:
                clip = float(clip)
            except ValueError:
                raise ConfigError(f"--clip-norm must be a positive number or 'adaptive', got {clip!r}") \
                    from None
            object.__setattr__(self, "clip_norm", clip)
        if isinstance(clip, bool) or (not isinstance(clip, str) and not (
            isinstance(clip, int | float) and math.isfinite(clip) and clip > 0
        )):
            raise ConfigError(f"--clip-norm must be a positive number or 'adaptive', got {clip!r}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("DP needs exactly one of --noise-multiplier and --target-epsilon")
        for name in ("noise_multiplier", "target_epsilon", "budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not (math.isfinite(value) and value > 0)):
                raise ConfigError(f"--{_flag(name)} must be a positive finite number, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, int | float) or not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"--accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if self.adaptive and self.mode != "central":
            raise ConfigError(f"--clip-norm adaptive needs --dp central (the clip count is noised by the "
                              f"coordinator); got --dp {self.mode}")

    @property
    def adaptive(self) -> bool:
        return self.clip_norm == "adaptive"

    @property
    def effective_budget(self) -> float | None:
        return self.budget if self.budget is not None else self.target_epsilon


def _flag(name: str) -> str:
    return {"budget": "epsilon-budget"}.get(name, name.replace("_", "-"))


class PrivacySession:
    """A run's DP state: noise multiplier, clip (maybe adaptive), events so far, budget.

    Args:
        config: the settings.
        sampling: how cohorts are chosen, as the accountant must assume it
            (see :mod:`fedge.privacy.accounting`); ``local`` mode always
            accounts as ``local``.
        sample_rate: Poisson ``q`` (``poisson`` only).
        population, cohort: for ``fixed`` sampling.
        expected_reports: the fixed denominator of the noised mean, and of
            adaptive clipping's fraction.
        planned_rounds: what ``target_epsilon`` is calibrated for.
        seed: ``None`` for noise from the OS entropy (every deployment), an
            integer for a reproducible simulation.
        grid: distributed mode only: what fixes the secure-aggregation grid
            (:class:`~fedge.privacy.distributed.DistributedGrid`). The
            accountant then charges the *effective* multiplier (the nominal
            one less the rounding inflation of the sensitivity): a target
            epsilon calibrates the effective one, and the devices add the
            nominal one, slightly more (:func:`~fedge.privacy.distributed.plan_grid`).

    Raises (from the constructor):
        ConfigError: distributed mode without a ``grid`` (it needs secure
            aggregation), a target no noise multiplier reaches, or adaptive
            clipping whose count noise would take the whole budget.
    """

    def __init__(self, config: PrivacyConfig, *, sampling: str, expected_reports: float,
                 planned_rounds: int, sample_rate: float = 1.0, population: int | None = None,
                 cohort: int | None = None, seed: int | None = None,
                 grid: DistributedGrid | None = None) -> None:
        if config.mode == "distributed" and grid is None:
            raise ConfigError(
                "--dp distributed needs secure aggregation (--secagg): the devices' noise shares "
                "protect them only if the coordinator sees nothing but their sum; add --secagg, "
                "or use --dp central or --dp local"
            )
        if config.mode != "distributed" and grid is not None:
            raise ConfigError(f"a distributed-DP grid was given for --dp {config.mode}")
        if not (math.isfinite(expected_reports) and expected_reports > 0):
            raise ConfigError(f"DP needs a positive expected cohort, got {expected_reports!r}")
        self.config = config
        self.sampling = "local" if config.mode == "local" else sampling
        self.sample_rate = sample_rate if self.sampling == "poisson" else 1.0
        self.population, self.cohort = population, cohort
        self.expected_reports = float(expected_reports)
        self.seed = seed
        self.accountant = Accountant(config.accountant, delta=config.delta)
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        else:
            assert config.target_epsilon is not None
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=config.target_epsilon, sample_rate=self.sample_rate, rounds=planned_rounds,
                delta=config.delta, accountant=config.accountant, sampling=self.sampling,
                population=population, cohort=cohort,
            )
        self.distributed: DistributedPlan | None = None
        if grid is not None:
            assert not isinstance(config.clip_norm, str)  # adaptive is central-only
            if config.noise_multiplier is not None:  # the devices add z; the accountant charges less
                self.distributed = plan_grid(grid, clip_norm=float(config.clip_norm),
                                             noise_multiplier=float(config.noise_multiplier))
            else:  # calibrated: charge what the target allows; the devices add a little more
                self.distributed = plan_grid(grid, clip_norm=float(config.clip_norm),
                                             charged=self.noise_multiplier)
            self.noise_multiplier = self.distributed.effective_noise_multiplier
        self.update_noise_multiplier = self.noise_multiplier
        self.adaptive: AdaptiveClip | None = None
        if config.adaptive:
            self.adaptive = AdaptiveClip.for_cohort(self.expected_reports)
            try:
                self.update_noise_multiplier = corrected_noise_multiplier(
                    self.noise_multiplier, self.adaptive.count_stddev
                )
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.clip_norm = self.adaptive.clip_norm
        else:
            assert not isinstance(config.clip_norm, str)
            self.clip_norm = float(config.clip_norm)
        self.ledger: list[LedgerEntry] = []
        self._counts: Counter[RoundEvent] = Counter()
        self._would_be: tuple[int, float] | None = None  # (rounds charged, epsilon after one more)
        self._clip_used: float | None = None  # the clip of the round in flight, once it moved

    # ---------------------------------------------------------------- the round

    def next_event(self) -> RoundEvent:
        return RoundEvent(self.noise_multiplier, sampling=self.sampling,
                          sample_rate=self.sample_rate if self.sampling == "poisson" else 1.0,
                          population=self.population, cohort=self.cohort)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta."""
        return self.ledger[-1].epsilon if self.ledger else 0.0

    def check_budget(self) -> None:
        """Refuse the next round if it would take epsilon past the budget.

        Raises:
            PrivacyBudgetError: it would.
        """
        budget = self.config.effective_budget
        if budget is None:
            return
        would_be = self._epsilon_after_next()
        # A calibrated multiplier reaches its target from below; the slack
        # only absorbs float noise in the accountant, never a real round.
        if would_be > budget * (1 + 1e-9):
            raise PrivacyBudgetError(budget=budget, spent=self.epsilon, would_be=would_be,
                                     delta=self.config.delta)

    def _epsilon_after_next(self) -> float:
        """Epsilon once the next round is charged (computed once per round, used twice)."""
        if self._would_be is None or self._would_be[0] != len(self.ledger):
            counts = self._counts.copy()
            counts[self.next_event()] += 1
            self._would_be = (len(self.ledger), self.accountant.epsilon_of_counts(counts))
        return self._would_be[1]

    def noise_share_stddev(self, min_contributors: int) -> float:
        """Distributed DP: one device's noise stddev when ``min_contributors`` shares must be summed.

        Raises:
            ConfigError: not in distributed mode.
        """
        if self.distributed is None:
            raise ConfigError(f"noise shares are for --dp distributed, not --dp {self.config.mode}")
        return share_stddev(noise_multiplier=self.distributed.noise_multiplier,
                            clip_norm=self.clip_norm, min_contributors=min_contributors)

    def device_privacy(self) -> DevicePrivacy:
        """What every device does to its update this round."""
        local = self.noise_multiplier * self.clip_norm if self.config.mode == "local" else 0.0
        return DevicePrivacy(clip_norm=self.clip_norm, local_stddev=local, seed=self.seed)

    def release(self, round_id: int, aggregate: Aggregate, *, unclipped: int) -> Aggregate:
        """The round's DP release from the mean of weight-1 clipped updates.

        Central: ``(sum + N(0, (z_delta C)^2 I)) / expected_reports``. Local
        and distributed: ``sum / expected_reports`` (the noise is already in
        the updates, or in their securely aggregated sum).
        Adaptive clipping then moves the clip for the next round.
        """
        total = P.scale(aggregate.delta, aggregate.total_weight)
        if self.config.mode == "central":
            rng = noise_generator(self.seed, round_id, _CENTRAL_KEY)
            delta = noised_mean(total, stddev=self.update_noise_multiplier * self.clip_norm,
                                denominator=self.expected_reports, rng=rng)
        else:
            delta = P.scale(total, 1.0 / self.expected_reports)
        self._adapt(round_id, unclipped)
        return Aggregate(delta=delta, total_weight=aggregate.total_weight, count=aggregate.count)

    def _adapt(self, round_id: int, unclipped: int) -> None:
        self._clip_used = self.clip_norm
        if self.adaptive is not None:
            rng = noise_generator(self.seed, round_id, _COUNT_KEY)
            self.adaptive = self.adaptive.update(unclipped, expected_reports=self.expected_reports, rng=rng)
            self.clip_norm = self.adaptive.clip_norm

    def charge(self, round_id: int) -> LedgerEntry:
        """Add round ``round_id``'s cost to the ledger; return its entry (epsilon after it)."""
        event = self.next_event()
        epsilon = self._epsilon_after_next()
        self._counts[event] += 1
        clip_used = self.clip_norm if self._clip_used is None else self._clip_used
        self._clip_used = None
        entry = LedgerEntry(
            round=round_id, mode=self.config.mode, noise_multiplier=self.noise_multiplier,
            sampling=event.sampling, sample_rate=event.sample_rate, population=event.population,
            cohort=event.cohort, clip_norm=clip_used, next_clip_norm=self.clip_norm,
            epsilon=epsilon, delta=self.config.delta,
        )
        self.ledger.append(entry)
        return entry

    def restore(self, entries: Iterable[LedgerEntry]) -> None:
        """Take back the ledger a store kept (after a restart): events, epsilon and the clip.

        Raises:
            ConfigError: an entry's delta differs from the configured one.
        """
        for entry in entries:
            if entry.delta != self.config.delta:
                raise ConfigError(
                    f"the privacy ledger was kept at delta {entry.delta:g}; the config says "
                    f"{self.config.delta:g}: epsilons at different deltas do not add up"
                )
            self._counts[entry.event] += 1
            self.ledger.append(entry)
            self.clip_norm = entry.next_clip_norm
            if self.adaptive is not None:
                self.adaptive = AdaptiveClip(entry.next_clip_norm, self.adaptive.target_quantile,
                                             self.adaptive.learning_rate, self.adaptive.count_stddev)

    def summary(self) -> dict[str, object]:
        """What ``summary.json`` records about privacy."""
        return {
            "mode": self.config.mode,
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "budget": self.config.effective_budget,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise_multiplier,
            "clip_norm": "adaptive" if self.config.adaptive else self.clip_norm,
            "final_clip_norm": self.clip_norm,
            "accountant": self.config.accountant,
            "sampling": self.sampling,
            "sample_rate": self.sample_rate,
            "rounds_charged": len(self.ledger),
            **({} if self.distributed is None else {
                "device_noise_multiplier": self.distributed.noise_multiplier,
                "grid_bits": self.distributed.bits,
                "grid_step": self.distributed.step,
                "sensitivity_inflation": self.distributed.sensitivity_inflation,
            }),
        }

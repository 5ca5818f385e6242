"""The simulation loop: the round logic of :mod:`fedge.rounds` over virtual devices.

Each round: select a cohort, pick its stragglers, let the backend train the
devices and stream their deltas into the strategy's accumulator, run the
round state machine over the reports, apply the strategy, and evaluate
centrally. Randomness is keyed by (seed, purpose, round), so a run is
reproducible for a seed, and bit-for-bit so with the ``inline`` backend.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge import __version__
from fedge import params as P
from fedge.data import load_federated
from fedge.data.dataset import FederatedData
from fedge.errors import ConfigError, PrivacyBudgetError, TaskError
from fedge.params import Params
from fedge.privacy.distributed import DistributedGrid
from fedge.privacy.session import PrivacySession
from fedge.rounds import Round, RoundState, choose_stragglers, select_cohort, select_within_deadline
from fedge.secagg import SecAggError
from fedge.sim.attacks import Attack, choose_malicious, flip_labels, parse_attack
from fedge.sim.backend_choice import choose_backend
from fedge.sim.backends import Backend, build_backend
from fedge.sim.config import SimConfig
from fedge.sim.devices import DeviceJob, PartialRound
from fedge.sim.profiles import FleetModel, build_profiles
from fedge.sim.secagg import SimSecAgg
from fedge.sim.traffic import params_payload_size
from fedge.strategies import (
    ServerState,
    Strategy,
    build_strategy,
    check_cohort,
    min_updates,
    strategy_options,
)
from fedge.tasks import load_task
from fedge.tasks.base import Task, TrainConfig

__all__ = ["RoundRecord", "SimResult", "Simulation", "simulate"]

logger = logging.getLogger(__name__)

# Purposes of the run's generator streams; never reuse a number.
_INIT, _SELECT, _PROFILES = 1, 2, 3


def _stream(seed: int, purpose: int, round_id: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, round_id])


@dataclass(frozen=True)
class RoundRecord:
    """One round as it went: participation, and central metrics when evaluated."""

    round: int
    state: str
    invited: int
    reported: int
    dropped: int
    rejected: int
    stragglers: int
    train_loss: float | None
    metrics: dict[str, float] | None
    elapsed_s: float
    bytes_up: int = 0
    bytes_down: int = 0
    epsilon: float | None = None  # DP: epsilon spent after this round, at the run's delta
    clip_norm: float | None = None  # DP: the clip norm this round used
    sim_time_s: float | None = None  # --profiles: the virtual clock when the round ended
    malicious: int | None = None  # malicious devices among the reporters, when attacked

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            "state": self.state,
            "invited": self.invited,
            "reported": self.reported,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "stragglers": self.stragglers,
            "train_loss": self.train_loss,
            "elapsed_s": round(self.elapsed_s, 6),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }
        if self.malicious is not None:
            out["malicious"] = self.malicious
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
            out["clip_norm"] = self.clip_norm
        if self.sim_time_s is not None:
            out["sim_time_s"] = round(self.sim_time_s, 3)
        if self.metrics is not None:
            out.update(self.metrics)
        return out


@dataclass
class SimResult:
    """A finished run: final params and metrics, per-round history and timings."""

    config: SimConfig
    params: Params
    metrics: dict[str, float]
    history: list[RoundRecord]
    num_devices: int
    num_examples: int
    timing: dict[str, float] = field(default_factory=dict)
    attack: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    stopped: str | None = None  # why the run ended before its last round (the privacy budget)
    fleet: dict[str, Any] | None = None  # --profiles: simulated time and participation
    backend: str = "inline"
    backend_info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds."""
        complete = sum(r.state == RoundState.COMPLETE.value for r in self.history)
        evaluated = [r.metrics for r in self.history if r.metrics is not None]
        return {
            "fedge_version": __version__,
            "accuracy": self.metrics.get("accuracy"),
            "loss": self.metrics.get("loss"),
            "metrics": dict(self.metrics),
            "best_accuracy": max((m["accuracy"] for m in evaluated), default=None),
            "rounds": len(self.history),
            "rounds_complete": complete,
            "devices": self.num_devices,
            "examples": self.num_examples,
            "params": P.num_values(self.params),
            # Measured: each payload serialized by the wire codec; "bytes_counted"
            # says whether zstd is included ("wire"), not ("raw"), or nothing was ("off").
            "bytes_up": sum(r.bytes_up for r in self.history),
            "bytes_down": sum(r.bytes_down for r in self.history),
            "bytes_counted": self.config.count_bytes,
            "wall_s": round(self.timing.get("wall_s", 0.0), 4),
            "backend": {"name": self.backend, **self.backend_info},
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
            "config": self.config.to_dict(),
            **({"attack": self.attack} if self.attack is not None else {}),
            "epsilon": None if self.privacy is None else self.privacy["epsilon"],
            "delta": None if self.privacy is None else self.privacy["delta"],
            "privacy": self.privacy,
            "stopped": self.stopped,
            "simulated_time_s": None if self.fleet is None else self.fleet["simulated_time_s"],
            "participation": None if self.fleet is None else self.fleet["participation"],
        }


class Simulation:
    """A built run: data loaded, task and strategy resolved, ready to :meth:`run`.

    Building does every check that can fail on the user's input (names, data,
    shapes) before any round starts, so a bad flag costs no training time.
    """

    def __init__(self, config: SimConfig, data: FederatedData | None = None) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.data = data or load_federated(
            config.data, partition=config.partition, num_devices=config.devices, seed=config.seed
        )
        n = len(self.data.devices)
        if config.cohort is not None and config.cohort > n:
            raise ConfigError(f"--cohort {config.cohort} is larger than the {n} devices")
        self.attack: Attack | None = None
        if config.attack is not None:
            self.attack = Attack(parse_attack(config.attack),
                                 choose_malicious(n, config.malicious, config.seed))
            if self.attack.spec.changes_data:
                self.data = flip_labels(self.data, self.attack.malicious)
        self.task: Task = load_task(config.task, self.data.spec)
        invited, updates, what = _expected_cohort(config, n)
        self.strategy: Strategy = _strategy_of(config, self.attack, invited, n)
        # The robust rules' condition on malicious devices, before any training.
        check_cohort(self.strategy, updates, what=what)
        self.privacy = _privacy_of(config, n, self.strategy, self._distributed_grid(n))
        # --profiles is checked here (a bad spec costs no training); the clock starts in run().
        self._profiles = (None if config.profiles is None
                          else build_profiles(config.profiles, n, _stream(config.seed, _PROFILES)))
        self.fleet: FleetModel | None = None
        self._last_round: dict[int, int] = {}
        mu = config.mu if config.mu is not None else self.strategy.device_mu
        self.train_config = TrainConfig(
            local_epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr, mu=mu
        )
        self.backend_choice = choose_backend(config, self.data, self.task, self.train_config)
        if self.backend_choice.backend == "ray":
            from fedge.sim.ray_backend import import_ray

            import_ray()  # Without Ray installed, fail before any training.
        self._data_given = data is not None
        self.secagg: SimSecAgg | None = None
        if config.secagg:
            distributed = config.dp == "distributed"
            self.secagg = SimSecAgg(
                strategy=self.strategy, k=config.secagg_k, threshold=config.secagg_threshold,
                clip=config.secagg_clip, bits=config.secagg_bits,
                # Under DP every update weighs 1 (docs/privacy.md), so the grid's weight range is 1.
                max_weight=1 if self.privacy is not None else max(len(ds) for ds in self.data.devices),
                dropout=config.secagg_dropout, seed=config.seed, cohort=config.cohort or (
                    n if config.sample_rate is None else None),
                privacy=self.privacy if distributed else None,
                min_contributors=config.dp_min_contributors,
            )
        self.setup_s = time.perf_counter() - t0

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> SimResult:
        """Run every round; ``on_round`` sees each record as soon as it exists."""
        cfg = self.config
        t_start = time.perf_counter()
        state = self.strategy.init(self._init_params())
        population = np.arange(len(self.data.devices), dtype=np.int64)
        self.fleet = self._fleet(state.params)
        t_backend = time.perf_counter()
        backend = self._build_backend()
        backend_s = time.perf_counter() - t_backend
        history: list[RoundRecord] = []
        train_s = eval_s = 0.0
        metrics: dict[str, float] = {}
        stopped: str | None = None
        try:
            t_rounds = time.perf_counter()
            for r in range(1, cfg.rounds + 1):
                if self.privacy is not None:
                    try:
                        self.privacy.check_budget()
                    except PrivacyBudgetError as e:
                        stopped = f"stopped before round {r}: {e}"
                        logger.info("%s", stopped)
                        break
                state, record, t_train = self._round(r, state, population, backend, t_start)
                train_s += t_train
                last = r == cfg.rounds
                if r % cfg.eval_every == 0 or last:
                    t0 = time.perf_counter()
                    metrics = self._evaluate(state.params)
                    eval_s += time.perf_counter() - t0
                    record = dataclasses.replace(
                        record, metrics=dict(metrics), elapsed_s=time.perf_counter() - t_start
                    )
                history.append(record)
                if on_round is not None:
                    on_round(record)
            if stopped is not None and (not history or history[-1].metrics is None):
                # The last round run was not evaluated (or none ran): the final model is.
                metrics = self._evaluate(state.params)
                if history:
                    history[-1] = dataclasses.replace(history[-1], metrics=dict(metrics))
            rounds_s = time.perf_counter() - t_rounds
        finally:
            backend.close()
        device_rounds = sum(rec.invited for rec in history)
        timing = {
            "setup_s": self.setup_s,
            "rounds_s": rounds_s,
            "train_s": train_s,
            "eval_s": eval_s,
            "device_rounds": float(device_rounds),
            "backend_start_s": backend_s,
            "wall_s": self.setup_s + (time.perf_counter() - t_start),
        }
        if self.backend_choice.backend == "inline" and device_rounds:
            # In one process, everything that is not the task's own train or
            # evaluate call is the framework's overhead.
            timing["overhead_ms_per_device_round"] = (
                1e3 * (rounds_s - train_s - eval_s) / device_rounds
            )
        return SimResult(
            config=cfg, params=state.params, metrics=metrics, history=history,
            num_devices=len(self.data.devices), num_examples=self.data.num_examples,
            timing=timing, privacy=None if self.privacy is None else self.privacy.summary(),
            stopped=stopped, attack=self._attack_summary(),
            fleet=None if self.fleet is None else {
                "simulated_time_s": round(self.fleet.now, 3), "participation": self.fleet.participation(),
            },
            backend=self.backend_choice.backend,
            backend_info=dict(getattr(backend, "describe", dict)()),
        )

    def _distributed_grid(self, n: int) -> DistributedGrid | None:
        """What fixes the secure-aggregation grid under --dp distributed (else ``None``)."""
        cfg, settings = self.config, self.config.privacy
        if settings is None or settings.mode != "distributed" or not cfg.secagg:
            return None
        assert not isinstance(settings.clip_norm, str)  # adaptive clipping is central-only
        dim = P.num_values(self.task.init_params(_stream(cfg.seed, _INIT)))
        return DistributedGrid(value_range=min(cfg.secagg_clip, float(settings.clip_norm)), dim=dim,
                               max_cohort=cfg.cohort or n, bits=cfg.secagg_bits)

    def _build_backend(self) -> Backend:
        cfg, name = self.config, self.backend_choice.backend
        if name == "ray":
            from fedge.sim.ray_backend import DataRecipe, RayBackend

            # Workers rebuild the data themselves from the same settings, unless the
            # caller handed the data over as values or an attack changed it (label flips).
            poisoned = self.attack is not None and self.attack.spec.changes_data
            recipe = None if self._data_given or poisoned else DataRecipe(
                cfg.data, cfg.partition, cfg.devices, cfg.seed
            )
            return RayBackend(
                task_name=cfg.task, spec=self.data.spec, strategy=self.strategy,
                datasets=self.data.devices, recipe=recipe, base_config=self.train_config,
                seed=cfg.seed, address=cfg.ray_address, cpus_per_device=cfg.ray_cpus_per_device,
                workers=cfg.workers, on_failure=cfg.ray_on_failure, attack=self.attack,
                encoding=cfg.encoding, count_bytes=cfg.count_bytes,
            )
        return build_backend(
            name, task=self.task, task_name=cfg.task, spec=self.data.spec,
            strategy=self.strategy, datasets=self.data.devices, base_config=self.train_config,
            seed=cfg.seed, workers=cfg.workers, attack=self.attack, encoding=cfg.encoding,
            count_bytes=cfg.count_bytes,
        )

    def _attack_summary(self) -> dict[str, Any] | None:
        if self.attack is None:
            return None
        f = getattr(self.strategy, "f", None)
        if f is None:
            f = getattr(getattr(self.strategy, "inner", None), "f", None)
        return {
            "attack": self.attack.spec.text,
            "malicious_fraction": self.config.malicious,
            "malicious_devices": len(self.attack.malicious),
            "malicious_ids": sorted(self.attack.malicious),
            "strategy_f": f,
        }

    def _round(
        self, r: int, state: ServerState, population: np.ndarray, backend: Backend, t_start: float
    ) -> tuple[ServerState, RoundRecord, float]:
        cfg = self.config
        rng = _stream(cfg.seed, _SELECT, r)
        cohort = self._cohort(r, population, rng)
        if cohort.size == 0:  # Poisson sampling can invite nobody; the round is empty.
            entry = self._charge(r)
            return state, RoundRecord(r, RoundState.ABANDONED.value, 0, 0, 0, 0, 0, None, None,
                                      time.perf_counter() - t_start, 0, 0, *entry), 0.0
        need = min_updates(self.strategy)
        if cohort.size < need:  # a robust rule's condition cannot hold for so few
            logger.warning("round %d abandoned: %d devices invited, %s needs %d updates",
                           r, cohort.size, self.strategy.name, need)
            entry = self._charge(r)
            return state, RoundRecord(r, RoundState.ABANDONED.value, int(cohort.size), 0,
                                      int(cohort.size), 0, 0, None, None,
                                      time.perf_counter() - t_start, 0, 0, *entry), 0.0
        stragglers = choose_stragglers(cohort, cfg.stragglers, rng)
        # As in the FedProx paper, a straggler manages a uniformly drawn number
        # of epochs in [1, E): partial work that FedProx keeps and FedAvg (in
        # the paper's setting, --drop-stragglers) throws away.
        short = dict(zip(stragglers.tolist(),
                         rng.integers(1, cfg.local_epochs, size=stragglers.size).tolist(),
                         strict=True)) if stragglers.size else {}
        how = self.privacy.device_privacy() if self.privacy is not None else None
        jobs = [
            DeviceJob(d, short.get(d, cfg.local_epochs), how)
            for d in cohort.tolist()
            if not (cfg.drop_stragglers and d in short)
        ]
        sim_time = None
        if self.fleet is not None:
            # The virtual clock: who finishes (by speed, link, chance and the deadline), and when.
            finished, _, round_s = self.fleet.play(
                [j.device_id for j in jobs], {j.device_id: j.local_epochs for j in jobs}, rng
            )
            keep = set(finished)
            jobs = [j for j in jobs if j.device_id in keep]
            self.fleet.advance(round_s)
            sim_time = self.fleet.now
        # Every invited device downloads the round's params (the same payload).
        bytes_down = params_payload_size(state.params, r, count=cfg.count_bytes) * int(cohort.size)
        if self.secagg is not None:
            state, record, took = self._secure_round(r, state, cohort, stragglers, jobs, backend, t_start,
                                                     sim_time)
            return state, dataclasses.replace(record, bytes_down=bytes_down), took
        rnd = Round.open(r, cohort.tolist(), min_updates=need)
        part = backend.run_round(r, state.params, jobs) if jobs else None
        if part is not None:
            for device, weight in part.reports:
                rnd.accept(device, weight, now=0.0)
        outcome = rnd.close()
        train_loss = None
        if outcome.state is RoundState.COMPLETE and part is not None:
            aggregate = part.accumulator.result()
            if self.privacy is not None:
                aggregate = self.privacy.release(r, aggregate, unclipped=part.unclipped)
            state = self.strategy.apply(state, aggregate)
            if part.train_loss_weight:
                train_loss = part.train_loss_sum / part.train_loss_weight
        elif part is not None and part.reports:
            logger.warning("round %d abandoned: %d updates, %s needs %d", r, len(part.reports),
                           self.strategy.name, need)
        elif part is not None and part.rejected:
            logger.warning("round %d abandoned: every update was refused as non-finite", r)
        else:
            logger.warning("round %d abandoned: every invited device dropped out", r)
        record = RoundRecord(
            round=r, state=outcome.state.value, invited=int(cohort.size),
            reported=len(outcome.reported), dropped=len(outcome.dropped),
            rejected=len(part.rejected) if part else 0, stragglers=int(stragglers.size),
            train_loss=train_loss, metrics=None, elapsed_s=time.perf_counter() - t_start,
            bytes_up=part.bytes_up if part else 0, bytes_down=bytes_down,
            malicious=None if self.attack is None or part is None else
            sum(d in self.attack.malicious for d, _ in part.reports),
            sim_time_s=sim_time,
        )
        if self.privacy is not None:
            epsilon, clip = self._charge(r)
            record = dataclasses.replace(record, epsilon=epsilon, clip_norm=clip)
        return state, record, part.train_s if part else 0.0

    def _secure_round(
        self, r: int, state: ServerState, cohort: np.ndarray, stragglers: np.ndarray,
        jobs: list[DeviceJob], backend: Backend, t_start: float, sim_time: float | None,
    ) -> tuple[ServerState, RoundRecord, float]:
        """A round under SecAgg+: see :mod:`fedge.sim.secagg`."""
        assert self.secagg is not None
        invited = [j.device_id for j in jobs]
        train_s, train_loss, rejected, uploaded = 0.0, None, 0, 0
        part: PartialRound | None = None
        # The device side of the protocol runs where the backend hosts it (its workers), else here.
        devices = getattr(backend, "secagg_call", None)
        distributed = self.config.dp == "distributed"
        try:
            server, masking, _, grid = self.secagg.prepare(r, state.params, invited, devices)
            part = backend.run_round(r, state.params, [
                # Distributed DP: the device's clip and noise happen in its masked upload.
                dataclasses.replace(j, secagg=masking[j.device_id],
                                    privacy=None if distributed else j.privacy)
                for j in jobs if j.device_id in masking
            ]) if masking else None
            done = [d for d, _ in part.reports] if part else []
            train_s = part.train_s if part else 0.0
            rejected = len(part.rejected) if part else 0
            uploaded = len(done)
            aggregate = self.secagg.finish(r, server, done, part.masked_sum if part else None,
                                           P.ParamsSpec.of(state.params), grid, devices)
            if self.privacy is not None and part is not None:
                aggregate = self.privacy.release(r, aggregate, unclipped=part.unclipped)
            state = self.strategy.apply(state, aggregate)
            outcome = RoundState.COMPLETE
            if part is not None and part.train_loss_weight:
                train_loss = part.train_loss_sum / part.train_loss_weight
        except SecAggError as e:
            logger.warning("round %d abandoned by secure aggregation: %s", r, e)
            outcome = RoundState.ABANDONED
        record = RoundRecord(
            round=r, state=outcome.value, invited=int(cohort.size), reported=uploaded,
            dropped=int(cohort.size) - uploaded - rejected, rejected=rejected,
            stragglers=int(stragglers.size), train_loss=train_loss, metrics=None,
            elapsed_s=time.perf_counter() - t_start, sim_time_s=sim_time,
            bytes_up=part.bytes_up if part is not None else 0,
        )
        if self.privacy is not None:
            epsilon, clip = self._charge(r)
            record = dataclasses.replace(record, epsilon=epsilon, clip_norm=clip)
        return state, record, train_s

    def _fleet(self, params: Params) -> FleetModel | None:
        cfg = self.config
        if self._profiles is None:
            return None
        self._last_round.clear()
        return FleetModel(
            self._profiles, [len(d) for d in self.data.devices],
            model_bytes=sum(int(v.nbytes) for v in params.values()), deadline_s=cfg.deadline_s,
        )

    def _cohort(self, r: int, population: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The round's cohort: from every device, or (with --profiles) from those available now."""
        cfg = self.config
        if self.fleet is None:
            return select_cohort(population, rng=rng, cohort_size=cfg.cohort, sample_rate=cfg.sample_rate)
        available = self.fleet.wait_for_devices()
        size = None if cfg.cohort is None else min(cfg.cohort, int(available.size))
        if cfg.selection == "deadline" and available.size:
            assert cfg.deadline_s is not None  # SimConfig requires it
            fleet, ids = self.fleet, available.tolist()
            picked, _ = select_within_deadline(
                ids, estimate_s={d: fleet.estimate_s(d, cfg.local_epochs) for d in ids},
                deadline_s=cfg.deadline_s, size=size or int(available.size), rng=rng,
                last_round=self._last_round, fairness=cfg.fairness,
            )
            cohort = np.asarray(picked, dtype=np.int64)
        else:
            cohort = select_cohort(available, rng=rng, cohort_size=size, sample_rate=cfg.sample_rate)
        for d in cohort.tolist():
            self._last_round[d] = r
        return cohort

    def _charge(self, r: int) -> tuple[float | None, float | None]:
        """Charge round ``r`` to the privacy ledger: every round that ran counts, even an empty one."""
        if self.privacy is None:
            return None, None
        entry = self.privacy.charge(r)
        return entry.epsilon, entry.clip_norm

    def _init_params(self) -> Params:
        try:
            params = self.task.init_params(_stream(self.config.seed, _INIT))
            P.check_finite(params, what="initial params")
            return {k: np.asarray(v) for k, v in params.items()}
        except TaskError:
            raise
        except Exception as e:
            raise TaskError(f"task init_params failed: {type(e).__name__}: {e}") from e

    def _evaluate(self, params: Params) -> dict[str, float]:
        try:
            metrics = self.task.evaluate(params, self.data.test)
            out = {str(k): float(v) for k, v in metrics.items()}
        except TaskError:
            raise
        except Exception as e:
            raise TaskError(
                f"task evaluate failed or returned non-numeric metrics: {type(e).__name__}: {e}"
            ) from e
        for key in ("loss", "accuracy"):
            if key not in out:
                raise TaskError(f"task evaluate must return {key!r}; it returned {sorted(out)}")
        return out


def _expected_cohort(config: SimConfig, n: int) -> tuple[int, int, str]:
    """Devices invited per round, updates expected per round, and how to say where from."""
    if config.cohort is not None:
        invited, what = config.cohort, f"--cohort {config.cohort}"
    elif config.sample_rate is not None:
        invited = max(1, round(config.sample_rate * n))
        what = f"--sample-rate {config.sample_rate:g} of {n} devices (about {invited} a round)"
    else:
        invited, what = n, f"all {n} devices every round"
    updates = invited
    if config.drop_stragglers and config.stragglers:
        updates -= round(config.stragglers * invited)
        what += f", less {invited - updates} dropped stragglers"
    return invited, updates, what


def _strategy_of(config: SimConfig, attack: Attack | None = None, invited: int = 0,
                 n: int = 1) -> Strategy:
    options = dict(config.strategy_options)
    known = strategy_options(config.strategy)
    if "seed" in known and "seed" not in options:  # norm-bound's noise follows --seed
        options["seed"] = float(config.seed)
    if attack is not None and "f" in known and "f" not in options:
        # The rule tolerates as many malicious devices as a round invites on
        # average (all of them when every device joins every round).
        options["f"] = float(math.ceil(len(attack.malicious) * invited / n - 1e-9))
        logger.info("strategy %s: f = %d malicious devices per round, from --malicious",
                    config.strategy, options["f"])
    if config.server_lr is not None:
        options["server_lr"] = config.server_lr
    if config.strategy == "fedprox" and config.mu is not None:
        options["mu"] = config.mu
    return build_strategy(config.strategy, options)


def _privacy_of(config: SimConfig, num_devices: int, strategy: Strategy,
                grid: DistributedGrid | None = None) -> PrivacySession | None:
    """The run's DP session, with the sampling assumption that matches how cohorts are chosen.

    ``grid``: --dp distributed's secure-aggregation grid (the session plans the noise on it).
    """
    settings = config.privacy
    if settings is None:
        return None
    if getattr(strategy, "needs_every_update", False):
        raise ConfigError(f"--dp needs a strategy that sums updates; {config.strategy!r} keeps each one")
    if config.sample_rate is not None:
        return PrivacySession(settings, sampling="poisson", sample_rate=config.sample_rate,
                              expected_reports=config.sample_rate * num_devices,
                              planned_rounds=config.rounds, seed=config.seed, grid=grid)
    if config.cohort is not None and config.cohort < num_devices:
        return PrivacySession(settings, sampling="fixed", population=num_devices, cohort=config.cohort,
                              expected_reports=float(config.cohort), planned_rounds=config.rounds,
                              seed=config.seed, grid=grid)
    return PrivacySession(settings, sampling="full", expected_reports=float(num_devices),
                          planned_rounds=config.rounds, seed=config.seed, grid=grid)


def simulate(
    config: SimConfig | None = None,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    **overrides: Any,
) -> SimResult:
    """Build and run a simulation: ``simulate(rounds=5, task="mlp")``.

    Raises:
        ConfigError: a bad setting, name or data (``ValueError`` subclass).
        TaskError, BackendError: training failed.
    """
    cfg = (config or SimConfig()).replace(**overrides) if overrides else (config or SimConfig())
    return Simulation(cfg).run(on_round)

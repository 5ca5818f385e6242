"""The simulator end to end through its Python API: rounds, backends, determinism, failures."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedge import params as P
from fedge.errors import BackendError, ConfigError, TaskError, UnknownNameError
from fedge.sim import SimConfig, Simulation, simulate


def _same(a: P.Params, b: P.Params) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_default_run_learns_and_reports_every_round() -> None:
    result = simulate(rounds=5)
    assert [r.round for r in result.history] == [1, 2, 3, 4, 5]
    first, last = result.history[0].metrics, result.history[-1].metrics
    assert first is not None and last is not None
    assert last["accuracy"] > first["accuracy"]
    assert last["loss"] < first["loss"]
    assert result.metrics == last
    assert all(r.invited == 20 and r.reported == 20 and r.state == "complete" for r in result.history)
    summary = result.summary()
    assert summary["rounds"] == 5
    assert summary["config"]["task"] == "logreg"
    assert summary["devices"] == 20


def test_inline_is_bit_for_bit_reproducible_and_seed_matters() -> None:
    a = simulate(rounds=3, cohort=7, seed=11)
    b = simulate(rounds=3, cohort=7, seed=11)
    c = simulate(rounds=3, cohort=7, seed=12)
    assert _same(a.params, b.params)
    assert a.metrics == b.metrics
    assert not _same(a.params, c.params)


def test_processes_backend_matches_inline() -> None:
    cfg = SimConfig(rounds=3, cohort=9, task="mlp:16", seed=3)
    inline = Simulation(cfg).run()
    procs = Simulation(cfg.replace(backend="processes", workers=2)).run()
    assert [r.invited for r in inline.history] == [r.invited for r in procs.history]
    for k in inline.params:
        np.testing.assert_allclose(procs.params[k], inline.params[k], rtol=1e-4, atol=1e-6)
    assert procs.metrics["accuracy"] == pytest.approx(inline.metrics["accuracy"], abs=0.01)


def test_cohort_and_poisson_sampling() -> None:
    fixed = simulate(rounds=4, cohort=5)
    assert all(r.invited == 5 for r in fixed.history)
    poisson = simulate(rounds=6, sample_rate=0.3, eval_every=3)
    invited = [r.invited for r in poisson.history]
    assert len(set(invited)) > 1  # independent sampling: the cohort size varies
    assert [r.round for r in poisson.history if r.metrics is not None] == [3, 6]


def test_stragglers_partial_work_and_dropping() -> None:
    kept = simulate(rounds=2, local_epochs=3, stragglers=0.5)
    assert all(r.stragglers == 10 and r.reported == 20 for r in kept.history)
    dropped = simulate(rounds=2, local_epochs=3, stragglers=0.5, drop_stragglers=True)
    assert all(r.dropped == 10 and r.reported == 10 for r in dropped.history)
    assert not _same(kept.params, dropped.params)


def test_round_with_every_device_dropped_is_abandoned_and_model_kept() -> None:
    sim = Simulation(SimConfig(rounds=2, local_epochs=2, stragglers=1.0, drop_stragglers=True))
    start = sim.strategy.init(sim.task.init_params(np.random.default_rng([0, 1, 0]))).params
    result = sim.run()
    assert all(r.state == "abandoned" and r.reported == 0 for r in result.history)
    assert _same(result.params, start)


def test_fedprox_and_adaptive_strategies_run() -> None:
    for strategy in ("fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox"):
        result = simulate(rounds=3, strategy=strategy)
        assert np.isfinite(result.metrics["loss"]), strategy
    prox = Simulation(SimConfig(strategy="fedprox"))
    assert prox.train_config.mu == pytest.approx(0.01)
    assert Simulation(SimConfig(strategy="fedprox", mu=1.0)).train_config.mu == 1.0


def test_synthetic_data_brings_its_own_devices() -> None:
    result = simulate(data="synthetic:1,1", rounds=2, cohort=10, local_epochs=2, lr=0.01)
    assert result.num_devices == 30
    assert all(r.invited == 10 for r in result.history)
    with pytest.raises(ConfigError, match="30"):
        simulate(data="synthetic:1,1", devices=20, rounds=1)


@pytest.fixture
def user_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of deliberately broken user tasks, importable by name (also in workers)."""
    (tmp_path / "fedge_test_tasks.py").write_text(textwrap.dedent("""
        import os
        import numpy as np
        from fedge.tasks import LogReg, TrainResult

        class NaNTask(LogReg):
            def train(self, params, data, config, rng):
                return TrainResult({k: np.full_like(v, np.nan) for k, v in params.items()}, len(data))

        class RaisingTask(LogReg):
            def train(self, params, data, config, rng):
                raise RuntimeError("disk on fire")

        class DyingTask(LogReg):
            def train(self, params, data, config, rng):
                os._exit(3)

        class ZeroWeightTask(LogReg):
            def train(self, params, data, config, rng):
                return TrainResult(dict(params), 0)

        class BadInitTask(LogReg):
            def init_params(self, rng):
                raise KeyError("weights.bin")

        class WordyEvalTask(LogReg):
            def evaluate(self, params, data):
                return {"loss": 1.0, "accuracy": "high"}

        class ListParamsTask(LogReg):
            def train(self, params, data, config, rng):
                return TrainResult(list(params.values()), len(data))

        def worker_only_failure(spec):
            import multiprocessing
            from fedge.errors import TaskError
            if multiprocessing.current_process().name != "MainProcess":
                raise TaskError("no accelerator in this worker")
            return LogReg(spec)

        nan_task = NaNTask
        bad_init_task = BadInitTask
        wordy_eval_task = WordyEvalTask
        list_params_task = ListParamsTask
        raising_task = RaisingTask
        dying_task = DyingTask
        zero_weight_task = ZeroWeightTask
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fedge_test_tasks"


def test_non_finite_updates_are_refused_not_aggregated(user_tasks: str) -> None:
    result = simulate(task=f"{user_tasks}:nan_task", rounds=2)
    assert all(r.rejected == 20 and r.reported == 0 for r in result.history)
    assert all(r.state == "abandoned" for r in result.history)
    P.check_finite(result.params)


def test_task_errors_name_the_device(user_tasks: str) -> None:
    with pytest.raises(TaskError, match=r"device .* disk on fire"):
        simulate(task=f"{user_tasks}:raising_task", rounds=1)
    with pytest.raises(TaskError, match=r"num_examples=0"):
        simulate(task=f"{user_tasks}:zero_weight_task", rounds=1)
    with pytest.raises(TaskError, match="disk on fire"):
        simulate(task=f"{user_tasks}:raising_task", rounds=1, backend="processes", workers=2)


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("bad_init_task", "init_params failed: KeyError"),
        ("wordy_eval_task", "non-numeric metrics"),
        ("list_params_task", "params and metrics as mappings"),
    ],
)
def test_malformed_task_behaviour_is_a_task_error(user_tasks: str, attr: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        simulate(task=f"{user_tasks}:{attr}", rounds=1)


def test_worker_errors_keep_their_kind_and_stay_one_line(user_tasks: str) -> None:
    with pytest.raises(TaskError) as info:
        simulate(task=f"{user_tasks}:worker_only_failure", rounds=1, backend="processes", workers=2)
    assert "no accelerator in this worker" in str(info.value)
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_a_dead_worker_is_a_backend_error(user_tasks: str) -> None:
    with pytest.raises(BackendError, match="died"):
        simulate(task=f"{user_tasks}:dying_task", rounds=1, backend="processes", workers=2)


def test_user_task_in_worker_processes(user_tasks: str) -> None:
    # A well-behaved user task (the LogReg subclass's parent) loads by name in workers too.
    result = simulate(task="fedge.tasks:LogReg", rounds=2, backend="processes", workers=2)
    assert result.metrics["accuracy"] > 0.2


def test_torch_cnn_runs() -> None:
    pytest.importorskip("torch")
    result = simulate(task="torch-cnn", rounds=2, devices=5)
    assert set(result.params) >= {"0.weight"} or len(result.params) >= 4
    assert 0 <= result.metrics["accuracy"] <= 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'"),
        ({"data": "mnist"}, "unknown data 'mnist'"),
        ({"partition": "zipf:2"}, "zipf"),
        ({"partition": "dirichlet:0"}, "alpha must be > 0"),
        ({"devices": 5000}, "5000 devices"),
        ({"cohort": 21}, "--cohort 21 is larger than the 20 devices"),
        ({"strategy_options": {"gamma": 1.0}}, "no option 'gamma'"),
        ({"strategy": "fedavgm", "strategy_options": {"momentum": 1.0}}, "momentum"),
    ],
)
def test_bad_names_and_values_raise_value_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate(rounds=1, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rounds", 0, "--rounds must be >= 1"),
        ("lr", -1.0, "--lr must be a positive number"),
        ("lr", float("nan"), "--lr"),
        ("mu", -0.5, "--mu"),
        ("sample_rate", 1.5, "--sample-rate"),
        ("stragglers", 1.2, "--stragglers"),
        ("stragglers", 0.5, "--local-epochs >= 2"),
        ("backend", "gpu", "unknown backend 'gpu'"),
        ("seed", -1, "--seed"),
        ("batch_size", 0, "--batch-size"),
    ],
)
def test_config_refuses_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**{field: value})  # type: ignore[arg-type]


def test_cohort_and_sample_rate_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        SimConfig(cohort=3, sample_rate=0.5)


def test_unknown_name_error_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        simulate(strategy="fedsgd", rounds=1)
    assert "fedavg" in info.value.known and "fedyogi" in info.value.known


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", "0.1", "lr must be float, got '0.1'"),
        ("task", None, "task must be str"),
        ("drop_stragglers", "no", "drop_stragglers must be bool"),
        ("strategy_options", "x", "strategy_options must be Mapping"),
        ("strategy_options", {"server_lr": True}, "strategy_options.server_lr must be a number"),
        ("stragglers", None, "stragglers must be float"),
    ],
)
def test_api_refuses_wrongly_typed_settings(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**{field: value})  # type: ignore[arg-type]


def test_api_accepts_numpy_numbers() -> None:
    cfg = SimConfig(seed=np.int64(3), lr=np.float32(0.5), rounds=2)  # type: ignore[arg-type]
    assert cfg.seed == 3 and type(cfg.seed) is int and cfg.lr == 0.5


def test_processes_backend_profiles_its_rounds() -> None:
    result = simulate(rounds=3, backend="processes", workers=2, devices=8)
    info = result.summary()["backend"]
    assert info["name"] == "processes" and info["workers"] == 2
    prof = info["profile"]
    assert prof["rounds"] == 3
    assert len(prof["worker_run_cpu_s"]) == 2 and all(c > 0 for c in prof["worker_run_cpu_s"])
    # Each worker's process did at least its rounds' work.
    assert all(p >= c - 0.05 for p, c in zip(prof["worker_process_cpu_s"], prof["worker_run_cpu_s"],
                                             strict=True))
    assert prof["critical_worker_cpu_s"] <= sum(prof["worker_run_cpu_s"])
    # The phases split the rounds' wall time.
    phases = prof["start_s"] + prof["workers_s"] + prof["collect_s"] + prof["engine_s"]
    assert phases == pytest.approx(result.timing["rounds_s"], abs=0.05)
    assert prof["engine_cpu_s"] > 0  # three evaluations at least

"""Tests for the built-in numpy tasks (LogReg, MLP) and the task registry ``load_task``."""

from __future__ import annotations

import math
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from params_asserts import assert_params_equal, deep_copy

from fedge.data.dataset import Dataset, DataSpec
from fedge.errors import ConfigError, TaskError, UnknownNameError
from fedge.params import Params
from fedge.tasks import MLP, LogReg, Task, TrainConfig, load_task

F64 = npt.NDArray[np.float64]
TASK_NAMES = ["logreg", "mlp:16"]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def distance(a: Params, b: Params) -> float:
    return math.sqrt(
        sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in a)
    )


def clusters(n_per_class: int, spec: DataSpec, seed: int = 0, spread: float = 0.3) -> Dataset:
    """Class ``c`` sits around ``4 * e_c`` (a unit vector): trivially separable."""
    g = rng(seed)
    y = np.repeat(np.arange(spec.num_classes), n_per_class).astype(np.int64)
    centers = np.zeros((spec.num_classes, spec.num_features))
    centers[np.arange(spec.num_classes), np.arange(spec.num_classes) % spec.num_features] = 4.0
    x = centers[y] + g.normal(0.0, spread, (y.size, spec.num_features))
    return Dataset(x=x.astype(np.float32), y=y)


@pytest.fixture
def spec() -> DataSpec:
    return DataSpec(num_features=3, num_classes=3)


@pytest.fixture
def data(spec: DataSpec) -> Dataset:
    return clusters(10, spec)


@pytest.fixture(params=TASK_NAMES)
def task(request: pytest.FixtureRequest, spec: DataSpec) -> Task:
    return load_task(request.param, spec)


# --- float64 references, independent of the code under test ---------------------------


def logits_ref(params: Params, x: F64) -> F64:
    p = {k: v.astype(np.float64) for k, v in params.items()}
    if "weight" in p:
        return x @ p["weight"] + p["bias"]
    return np.maximum(x @ p["w1"] + p["b1"], 0.0) @ p["w2"] + p["b2"]


def mean_xent_ref(params: Params, data: Dataset) -> float:
    z = logits_ref(params, data.x.astype(np.float64))
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(data)), data.y].mean())


def numerical_grad(params: Params, data: Dataset, eps: float = 1e-6) -> dict[str, F64]:
    """Central differences of the mean cross-entropy, in float64."""
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    grads: dict[str, F64] = {}
    for k, v in p64.items():
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            old = v[i]
            v[i] = old + eps
            up = mean_xent_ref(p64, data)  # type: ignore[arg-type]
            v[i] = old - eps
            down = mean_xent_ref(p64, data)  # type: ignore[arg-type]
            v[i] = old
            g[i] = (up - down) / (2 * eps)
        grads[k] = g
    return grads


# --- init -----------------------------------------------------------------------------


def test_init_is_deterministic_per_seed(task: Task) -> None:
    a = task.init_params(rng(5))
    b = task.init_params(rng(5))
    c = task.init_params(rng(6))
    assert_params_equal(a, b)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())
    assert all(np.isfinite(v).all() for v in a.values())


@pytest.mark.parametrize(("features", "classes"), [(3, 3), (5, 2), (1, 7)])
def test_logreg_shapes_follow_the_spec(features: int, classes: int) -> None:
    p = load_task("logreg", DataSpec(features, classes)).init_params(rng())
    assert list(p) == ["weight", "bias"]
    assert p["weight"].shape == (features, classes)
    assert p["bias"].shape == (classes,)
    assert not p["bias"].any()


@pytest.mark.parametrize(("features", "classes"), [(3, 3), (5, 2), (1, 7)])
def test_mlp_shapes_follow_the_spec(features: int, classes: int) -> None:
    p = load_task("mlp:16", DataSpec(features, classes)).init_params(rng())
    assert list(p) == ["w1", "b1", "w2", "b2"]
    assert p["w1"].shape == (features, 16)
    assert p["b1"].shape == (16,)
    assert p["w2"].shape == (16, classes)
    assert p["b2"].shape == (classes,)


def test_mlp_default_width(spec: DataSpec) -> None:
    task = load_task("mlp", spec)
    assert isinstance(task, MLP)
    assert task.hidden == 512
    assert task.init_params(rng())["w1"].shape == (3, 512)


def test_mlp_refuses_zero_width_directly(spec: DataSpec) -> None:
    with pytest.raises(ConfigError, match="hidden size must be >= 1, got 0"):
        MLP(spec, hidden=0)


# --- train ----------------------------------------------------------------------------


def test_train_mutates_neither_params_nor_data(task: Task, data: Dataset) -> None:
    params = task.init_params(rng())
    params_before = deep_copy(params)
    x_before, y_before = data.x.copy(), data.y.copy()
    for cfg in (TrainConfig(batch_size=64, lr=0.5), TrainConfig(batch_size=4, mu=0.5, lr=0.5)):
        result = task.train(params, data, cfg, rng())
        assert_params_equal(params, params_before)
        np.testing.assert_array_equal(data.x, x_before)
        np.testing.assert_array_equal(data.y, y_before)
        for k in params:
            assert not np.shares_memory(result.params[k], params[k])
            assert result.params[k].shape == params[k].shape
            assert result.params[k].dtype == np.float32


def test_train_reports_example_count_and_loss(task: Task, data: Dataset) -> None:
    params = task.init_params(rng())
    result = task.train(params, data, TrainConfig(batch_size=len(data), lr=0.1), rng())
    assert result.num_examples == 30
    # One full batch: the reported loss is the loss before the step.
    assert result.metrics["train_loss"] == pytest.approx(mean_xent_ref(params, data), rel=1e-4)


def test_train_is_deterministic_per_seed(task: Task, data: Dataset) -> None:
    params = task.init_params(rng())
    cfg = TrainConfig(local_epochs=2, batch_size=4, lr=0.3)
    a = task.train(params, data, cfg, rng(1)).params
    b = task.train(params, data, cfg, rng(1)).params
    assert_params_equal(a, b)


def test_train_lowers_the_loss_and_fits_separable_data(task: Task, data: Dataset) -> None:
    params = task.init_params(rng())
    before = task.evaluate(params, data)
    result = task.train(params, data, TrainConfig(local_epochs=20, batch_size=8, lr=0.2), rng())
    after = task.evaluate(result.params, data)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["loss"] < 0.1
    assert after["accuracy"] == 1.0
    # And it generalises to fresh draws of the same clusters.
    assert task.evaluate(result.params, clusters(20, DataSpec(3, 3), seed=9))["accuracy"] == 1.0


@pytest.mark.parametrize("name", TASK_NAMES)
def test_one_sgd_step_follows_the_numerical_gradient(name: str) -> None:
    spec = DataSpec(num_features=4, num_classes=3)
    task = load_task(name, spec)
    g = rng(3)
    data = Dataset(
        x=g.normal(0.0, 1.0, (12, 4)).astype(np.float32),
        y=np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0], dtype=np.int64),
    )
    params = task.init_params(rng(4))
    # Make the biases non-zero so their gradients are exercised off the symmetric start.
    params = {k: v + np.float32(0.1) if k.startswith("b") else v for k, v in params.items()}
    if "w1" in params:
        # Central differences are only valid away from the ReLU kink.
        pre = data.x.astype(np.float64) @ params["w1"] + params["b1"]
        assert np.abs(pre).min() > 1e-3
    lr = 0.5
    cfg = TrainConfig(local_epochs=1, batch_size=len(data), lr=lr)
    stepped = task.train(params, data, cfg, rng()).params
    numeric = numerical_grad(params, data)
    for k in params:
        taken = (params[k].astype(np.float64) - stepped[k].astype(np.float64)) / lr
        scale = np.abs(numeric[k]).max()
        assert scale > 1e-3, k  # the check is not vacuous
        np.testing.assert_allclose(taken, numeric[k], rtol=1e-3, atol=1e-3 * scale, err_msg=k)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_mu_zero_step_equals_plain_sgd_and_first_step_ignores_mu(name: str) -> None:
    # At the first step w == w_global, so the proximal gradient mu * (w - w_global) is 0.
    spec = DataSpec(num_features=3, num_classes=3)
    task = load_task(name, spec)
    data = clusters(4, spec)
    params = task.init_params(rng())
    one_batch = len(data)
    plain = task.train(params, data, TrainConfig(batch_size=one_batch, lr=0.1), rng()).params
    prox = task.train(params, data, TrainConfig(batch_size=one_batch, lr=0.1, mu=5.0), rng())
    assert_params_equal(prox.params, plain)


def test_proximal_term_keeps_params_closer_to_the_start(task: Task, data: Dataset) -> None:
    params = task.init_params(rng())

    def moved(mu: float) -> float:
        # lr * mu stays well below 1, where the explicit proximal step is a contraction.
        cfg = TrainConfig(local_epochs=5, batch_size=5, lr=0.05, mu=mu)
        return distance(task.train(params, data, cfg, rng(1)).params, params)

    free, some, more = moved(0.0), moved(1.0), moved(4.0)
    assert free > 0.0
    assert some < free
    assert more < some


def test_huge_mu_barely_moves(task: Task, data: Dataset) -> None:
    params = task.init_params(rng())
    one_batch = len(data)
    # lr * mu = 0.5 keeps the proximal pull stable; with mu = 1e3 the params settle
    # about |grad| / mu from the start, while without it they drift lr * |grad| a step.
    free = task.train(
        params, data, TrainConfig(local_epochs=200, batch_size=one_batch, lr=5e-4), rng()
    ).params
    held = task.train(
        params, data, TrainConfig(local_epochs=200, batch_size=one_batch, lr=5e-4, mu=1e3), rng()
    ).params
    assert distance(held, params) < 0.03 * distance(free, params)
    assert distance(held, params) < 1e-2


# --- evaluate -------------------------------------------------------------------------


def test_evaluate_returns_loss_and_accuracy_in_range(task: Task, data: Dataset) -> None:
    metrics = task.evaluate(task.init_params(rng()), data)
    assert {"loss", "accuracy"} <= set(metrics)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["loss"] > 0.0
    assert metrics["loss"] == pytest.approx(mean_xent_ref(task.init_params(rng()), data), rel=1e-5)


def test_evaluate_known_answer_with_zero_weights(spec: DataSpec) -> None:
    # All logits 0: loss ln 3 for every example; argmax ties go to class 0.
    task = load_task("logreg", spec)
    zero = {"weight": np.zeros((3, 3), dtype=np.float32), "bias": np.zeros(3, dtype=np.float32)}
    data = Dataset(
        x=np.ones((4, 3), dtype=np.float32), y=np.array([0, 1, 2, 0], dtype=np.int64)
    )
    metrics = task.evaluate(zero, data)
    assert metrics["loss"] == pytest.approx(math.log(3))
    assert metrics["accuracy"] == 0.5


def test_evaluate_known_answer_logreg_by_hand() -> None:
    task = load_task("logreg", DataSpec(num_features=2, num_classes=2))
    # logits of x = (1, 0): (1, 0); of x = (0, 1): (0, 2)
    p = {
        "weight": np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32),
        "bias": np.zeros(2, dtype=np.float32),
    }
    data = Dataset(x=np.eye(2, dtype=np.float32), y=np.array([0, 0], dtype=np.int64))
    metrics = task.evaluate(p, data)
    # example 1: -log(e / (e + 1)) = log(1 + e^-1); example 2: log(1 + e^2) - 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"] == 0.5


def test_evaluate_on_empty_data_refused(task: Task) -> None:
    empty = Dataset(x=np.zeros((0, 3), dtype=np.float32), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(TaskError, match="empty"):
        task.evaluate(task.init_params(rng()), empty)


def test_train_on_empty_data_is_a_task_error(task: Task) -> None:
    empty = Dataset(x=np.zeros((0, 3), dtype=np.float32), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(TaskError, match="empty"):
        task.train(task.init_params(rng()), empty, TrainConfig(), rng())


# --- data that does not fit the task --------------------------------------------------


def test_wrong_feature_count_refused(task: Task) -> None:
    params = task.init_params(rng())
    bad = Dataset(x=np.zeros((2, 4), dtype=np.float32), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(TaskError, match=r"built for 3 features, data has shape \(2, 4\)"):
        task.train(params, bad, TrainConfig(), rng())
    with pytest.raises(TaskError, match="built for 3 features"):
        task.evaluate(params, bad)


def test_features_not_2d_refused(task: Task) -> None:
    bad = Dataset(x=np.zeros((2, 3, 1), dtype=np.float32), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(TaskError, match="features"):
        task.evaluate(task.init_params(rng()), bad)


def test_label_out_of_range_refused(task: Task) -> None:
    params = task.init_params(rng())
    bad = Dataset(x=np.zeros((2, 3), dtype=np.float32), y=np.array([0, 3], dtype=np.int64))
    with pytest.raises(TaskError, match=r"built for 3 classes \(labels 0..2\), data has label 3"):
        task.train(params, bad, TrainConfig(), rng())
    with pytest.raises(TaskError, match="3 classes"):
        task.evaluate(params, bad)
    negative = Dataset(x=np.zeros((2, 3), dtype=np.float32), y=np.array([0, -1], dtype=np.int64))
    with pytest.raises(TaskError, match="data has label -1"):
        task.train(params, negative, TrainConfig(), rng())


def test_the_label_check_is_computed_once_per_dataset(task: Task) -> None:
    data = Dataset(x=np.zeros((3, 3), dtype=np.float32), y=np.array([2, 0, 1], dtype=np.int64))
    assert data.label_range == (0, 2)
    params = task.init_params(rng())
    task.train(params, data, TrainConfig(), rng())
    task.train(params, data, TrainConfig(), rng())  # the cached range, checked again
    assert "label_range" in vars(data) and data.label_range == (0, 2)
    assert Dataset(x=np.zeros((0, 3), dtype=np.float32), y=np.zeros(0, dtype=np.int64)).label_range == (0, -1)


# --- load_task ------------------------------------------------------------------------


def test_load_builtin_tasks(spec: DataSpec) -> None:
    logreg = load_task("logreg", spec)
    assert isinstance(logreg, LogReg) and logreg.spec == spec
    mlp = load_task("mlp:16", spec)
    assert isinstance(mlp, MLP) and mlp.hidden == 16 and mlp.spec == spec
    assert isinstance(logreg, Task) and isinstance(mlp, Task)


@pytest.mark.parametrize("name", ["nope", "", "nope:", ":attr", "LOGREG"])
def test_unknown_task_name(spec: DataSpec, name: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        load_task(name, spec)
    assert info.value.name == name
    for known in ("logreg", "mlp", "module:attr"):
        assert known in str(info.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mlp:abc", r"task 'mlp:abc': hidden size must be an integer, got 'abc'"),
        ("mlp:", r"hidden size must be an integer"),
        ("mlp:1.5", r"hidden size must be an integer"),
        ("mlp:0", r"task 'mlp:0': hidden size must be >= 1, got 0"),
        ("mlp:-4", r"hidden size must be >= 1, got -4"),
        ("logreg:3", r"task 'logreg' takes no argument, got 'logreg:3'"),
    ],
)
def test_bad_builtin_argument(spec: DataSpec, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_task(name, spec)


USER_MODULE = """
from fedge.tasks import LogReg
from fedge.data.dataset import DataSpec

seen_specs = []


def make(spec):
    seen_specs.append(spec)
    return LogReg(spec)


TASK = LogReg(DataSpec(num_features=2, num_classes=2))
NOT_A_TASK = 42


def returns_none(spec):
    return None


def needs_two_arguments(a, b):
    return None


class ConstantTask:
    '''A user's Task class: a natural factory, called with the spec.'''

    def __init__(self, spec):
        self.spec = spec

    def init_params(self, rng):
        import numpy as np
        return {"w": np.zeros(1, dtype=np.float32)}

    def train(self, params, data, config, rng):
        raise NotImplementedError

    def evaluate(self, params, data):
        return {"loss": 0.0, "accuracy": 1.0}
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Write a task module under tmp_path, importable under a fresh name; yield that name."""
    name = f"fedge_test_user_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_task_from_a_factory(user_module: str, spec: DataSpec) -> None:
    task = load_task(f"{user_module}:make", spec)
    assert isinstance(task, LogReg)
    assert task.spec == spec
    assert sys.modules[user_module].seen_specs == [spec]


def test_user_task_as_an_object(user_module: str, spec: DataSpec) -> None:
    task = load_task(f"{user_module}:TASK", spec)
    assert task is sys.modules[user_module].TASK
    assert isinstance(task, LogReg)


def test_user_task_module_missing(spec: DataSpec) -> None:
    with pytest.raises(ConfigError, match=r"cannot import module 'fedge_no_such_module_x'"):
        load_task("fedge_no_such_module_x:task", spec)


def test_user_task_attribute_missing(user_module: str, spec: DataSpec) -> None:
    with pytest.raises(ConfigError, match=rf"module '{user_module}' has no attribute 'missing'"):
        load_task(f"{user_module}:missing", spec)


@pytest.mark.parametrize("attr", ["NOT_A_TASK", "returns_none"])
def test_user_object_that_is_not_a_task(user_module: str, spec: DataSpec, attr: str) -> None:
    with pytest.raises(ConfigError, match=rf"task '{user_module}:{attr}' is not a task"):
        load_task(f"{user_module}:{attr}", spec)


def test_user_task_class_is_called_as_a_factory(user_module: str, spec: DataSpec) -> None:
    task = load_task(f"{user_module}:ConstantTask", spec)
    assert isinstance(task, sys.modules[user_module].ConstantTask)
    assert task.spec == spec  # type: ignore[attr-defined]


def test_user_callable_that_is_not_a_factory(user_module: str, spec: DataSpec) -> None:
    with pytest.raises(
        ConfigError, match=rf"task '{user_module}:needs_two_arguments': building it failed"
    ) as info:
        load_task(f"{user_module}:needs_two_arguments", spec)
    assert isinstance(info.value.__cause__, TypeError)

"""TorchTask: params <-> module round trip, seeded init, SGD and FedProx, evaluate, errors."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import Tensor, nn  # noqa: E402

from fedge.data.dataset import Dataset, DataSpec  # noqa: E402
from fedge.errors import ConfigError, TaskError, UnknownNameError  # noqa: E402
from fedge.params import Params  # noqa: E402
from fedge.tasks.base import Task, TrainConfig  # noqa: E402
from fedge.tasks.torch_task import TorchTask, _load, _params_of, cnn_task  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread; restore the count for other tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, seed: int = 0) -> Dataset:
    """Separable 8x8 images: class 0 is bright on the left half, class 1 on the right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(0.0, 0.3, size=(n, 8, 8))
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    return Dataset(x=x.reshape(n, 64).astype(np.float32), y=y.astype(np.int64))


@pytest.fixture
def cnn() -> TorchTask:
    return cnn_task(DataSpec(num_features=64, num_classes=2))


@pytest.fixture
def images() -> Dataset:
    return _images(96)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _mlp_task() -> TorchTask:
    return TorchTask(name="mlp", model_fn=_mlp, loss_fn=nn.functional.cross_entropy)


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def _tabular(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1).astype(np.int64)
    return Dataset(x=x, y=y)


def _distance(a: Params, b: Params) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def test_torch_task_is_a_task(cnn: TorchTask) -> None:
    assert isinstance(cnn, Task)
    assert cnn.name == "torch-cnn"


def test_params_are_float32_state_dict_entries_in_order(cnn: TorchTask) -> None:
    params = cnn.init_params(np.random.default_rng(0))
    assert list(params) == list(cnn.model_fn().state_dict())
    assert all(v.dtype == np.float32 for v in params.values())
    assert params["6.weight"].shape == (2, 32 * 4 * 4)


def test_round_trip_params_model_params_is_exact(cnn: TorchTask) -> None:
    rng = np.random.default_rng(1)
    shapes = {k: v.shape for k, v in cnn.init_params(rng).items()}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    model = cnn.model_fn()
    _load(model, params)
    back = _params_of(model)
    assert list(back) == list(params)
    for k, v in params.items():
        np.testing.assert_array_equal(back[k], v)
        assert not np.shares_memory(back[k], v)
    # Nor do the params alias the module: changing the module leaves them be.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    np.testing.assert_array_equal(back["0.weight"], params["0.weight"])


def test_round_trip_carries_batchnorm_buffers() -> None:
    task = TorchTask(name="bn", model_fn=_bn_model, loss_fn=nn.functional.cross_entropy)
    params = task.init_params(np.random.default_rng(0))
    assert "1.running_mean" in params and "1.running_var" in params
    assert "1.num_batches_tracked" not in params  # an int64 counter, not a param
    params["1.running_mean"] = np.arange(4, dtype=np.float32)
    model = _bn_model()
    _load(model, params)
    np.testing.assert_array_equal(_params_of(model)["1.running_mean"], np.arange(4))


def test_batchnorm_running_stats_travel_with_training() -> None:
    task = TorchTask(name="bn", model_fn=_bn_model, loss_fn=nn.functional.cross_entropy)
    params = task.init_params(np.random.default_rng(0))
    out = task.train(params, _tabular(40), TrainConfig(batch_size=10), np.random.default_rng(1))
    assert not np.array_equal(out.params["1.running_mean"], params["1.running_mean"])


def test_init_is_deterministic_per_seed_and_differs_across_seeds(cnn: TorchTask) -> None:
    a = cnn.init_params(np.random.default_rng(7))
    b = cnn.init_params(np.random.default_rng(7))
    c = cnn.init_params(np.random.default_rng(8))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_global_torch_rng_is_left_alone(cnn: TorchTask, images: Dataset) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    params = cnn.init_params(np.random.default_rng(0))
    cnn.train(params, images, TrainConfig(), np.random.default_rng(0))
    cnn.evaluate(params, images)
    assert torch.equal(torch.rand(3), expected)


def test_train_is_deterministic_for_a_seed(cnn: TorchTask, images: Dataset) -> None:
    params = cnn.init_params(np.random.default_rng(0))
    a = cnn.train(params, images, TrainConfig(), np.random.default_rng(5))
    b = cnn.train(params, images, TrainConfig(), np.random.default_rng(5))
    for k in params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_train_does_not_mutate_inputs_and_lowers_the_loss(cnn: TorchTask, images: Dataset) -> None:
    params = cnn.init_params(np.random.default_rng(0))
    before = {k: v.copy() for k, v in params.items()}
    x_before, y_before = images.x.copy(), images.y.copy()
    start = cnn.evaluate(params, images)["loss"]

    result = cnn.train(
        params, images, TrainConfig(local_epochs=5, batch_size=16, lr=0.1), np.random.default_rng(1)
    )

    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        assert not np.shares_memory(result.params[k], params[k])
    np.testing.assert_array_equal(images.x, x_before)
    np.testing.assert_array_equal(images.y, y_before)
    assert result.num_examples == len(images)
    assert result.metrics["train_loss"] < start
    assert cnn.evaluate(result.params, images)["loss"] < 0.5 * start


def test_train_accepts_read_only_params_and_data(cnn: TorchTask) -> None:
    params = cnn.init_params(np.random.default_rng(0))
    for v in params.values():
        v.flags.writeable = False
    data = _images(20)
    data.x.flags.writeable = False
    data.y.flags.writeable = False
    result = cnn.train(params, data, TrainConfig(batch_size=8), np.random.default_rng(0))
    assert result.num_examples == 20


def test_fedprox_keeps_params_closer_to_the_start(cnn: TorchTask, images: Dataset) -> None:
    params = cnn.init_params(np.random.default_rng(0))
    plain = cnn.train(
        params, images, TrainConfig(local_epochs=3, batch_size=16, lr=0.1), np.random.default_rng(2)
    )
    prox = cnn.train(
        params,
        images,
        TrainConfig(local_epochs=3, batch_size=16, lr=0.1, mu=1.0),
        np.random.default_rng(2),
    )
    assert _distance(prox.params, params) < _distance(plain.params, params)


def test_fedprox_step_matches_the_hand_computed_update() -> None:
    # One weight w, inputs x = 1, loss = sum of logits, so the data gradient is 1.
    # Two steps of batch 1, lr 0.1, mu 2, from w0 = 0.5:
    #   w1 = 0.5 - 0.1 * 1                       = 0.4   (w0 is the anchor: no pull yet)
    #   w2 = 0.4 - 0.1 * (1 + 2 * (0.4 - 0.5))   = 0.32  (plain SGD would give 0.3)
    def model_fn() -> nn.Module:
        return nn.Linear(1, 1, bias=False)

    def sum_loss(logits: Tensor, labels: Tensor) -> Tensor:
        return logits.sum()

    task = TorchTask(name="one", model_fn=model_fn, loss_fn=sum_loss)
    params = {"weight": np.array([[0.5]], dtype=np.float32)}
    data = Dataset(x=np.ones((2, 1), dtype=np.float32), y=np.zeros(2, dtype=np.int64))
    prox = task.train(
        params, data, TrainConfig(batch_size=1, lr=0.1, mu=2.0), np.random.default_rng(0)
    )
    plain = task.train(params, data, TrainConfig(batch_size=1, lr=0.1), np.random.default_rng(0))
    assert prox.params["weight"][0, 0] == pytest.approx(0.32)
    assert plain.params["weight"][0, 0] == pytest.approx(0.3)
    assert prox.metrics["train_loss"] == pytest.approx((0.5 + 0.4) / 2)


def test_evaluate_returns_loss_and_accuracy(cnn: TorchTask, images: Dataset) -> None:
    metrics = cnn.evaluate(cnn.init_params(np.random.default_rng(0)), images)
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_evaluate_accuracy_counts_correct_predictions() -> None:
    # A linear model whose argmax is feature 0 vs 1: checkable by hand. The
    # dropout layer must be off (eval mode) or the figures would change.
    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 2, bias=False), nn.Dropout(p=0.9))

    task = TorchTask(name="lin", model_fn=model_fn, loss_fn=nn.functional.cross_entropy)
    params = {"0.weight": np.eye(2, dtype=np.float32)}
    x = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 1], dtype=np.int64)
    metrics = task.evaluate(params, Dataset(x=x, y=y))
    assert metrics["accuracy"] == 0.75
    expected = float(nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(y)))
    assert metrics["loss"] == pytest.approx(expected)


def test_a_general_module_works_through_torch_task() -> None:
    task = _mlp_task()
    data = _tabular(120)
    params = task.init_params(np.random.default_rng(0))
    start = task.evaluate(params, data)
    out = task.train(
        params, data, TrainConfig(local_epochs=10, batch_size=20, lr=0.2), np.random.default_rng(0)
    )
    end = task.evaluate(out.params, data)
    assert end["loss"] < start["loss"]
    assert end["accuracy"] > start["accuracy"]


def test_cnn_task_pickles(cnn: TorchTask) -> None:
    copy = pickle.loads(pickle.dumps(cnn))
    rng_seed = 3
    a = cnn.init_params(np.random.default_rng(rng_seed))
    b = copy.init_params(np.random.default_rng(rng_seed))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cnn_task_refuses_data_that_are_not_8x8_images() -> None:
    with pytest.raises(ConfigError, match=r"8x8.*got 60 features"):
        cnn_task(DataSpec(num_features=60, num_classes=10))


def test_wrong_output_shape_raises_task_error() -> None:
    class Unflat(nn.Module):
        """Scores of shape (batch, 3, 1) instead of (batch, 3)."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = self.lin(x)
            return out.unsqueeze(-1)

    task = TorchTask(name="unflat", model_fn=Unflat, loss_fn=nn.functional.cross_entropy)
    params = task.init_params(np.random.default_rng(0))
    with pytest.raises(TaskError, match=r"'unflat'.*\(batch, num_classes\).*\(4, 3, 1\)"):
        task.evaluate(params, _tabular(4))
    with pytest.raises(TaskError, match="unflat"):
        task.train(params, _tabular(4), TrainConfig(), np.random.default_rng(0))


def test_data_with_the_wrong_feature_count_raises_task_error(cnn: TorchTask) -> None:
    params = cnn.init_params(np.random.default_rng(0))
    with pytest.raises(TaskError, match=r"torch-cnn.*\(5,\).*\(1, 8, 8\)"):
        cnn.evaluate(params, _tabular(4))
    mlp = _mlp_task()
    with pytest.raises(TaskError, match=r"'mlp'.*shape \(4, 64\)"):
        mlp.evaluate(mlp.init_params(np.random.default_rng(0)), _images(4))


def test_labels_beyond_the_model_classes_raise_task_error(cnn: TorchTask) -> None:
    data = _images(6)
    bad = Dataset(x=data.x, y=np.full(6, 2, dtype=np.int64))
    with pytest.raises(TaskError, match=r"labels go up to 2.*2 classes"):
        cnn.evaluate(cnn.init_params(np.random.default_rng(0)), bad)


def test_non_scalar_loss_raises_task_error() -> None:
    task = TorchTask(
        name="vec",
        model_fn=_mlp,
        loss_fn=lambda logits, y: nn.functional.cross_entropy(logits, y, reduction="none"),
    )
    with pytest.raises(TaskError, match="scalar"):
        task.evaluate(task.init_params(np.random.default_rng(0)), _tabular(4))


def test_model_fn_must_return_a_module() -> None:
    task = TorchTask(
        name="nope",
        model_fn=lambda: "model",  # type: ignore[arg-type,return-value]
        loss_fn=nn.functional.cross_entropy,
    )
    with pytest.raises(TaskError, match=r"'nope'.*str"):
        task.init_params(np.random.default_rng(0))


def test_params_that_do_not_fit_the_model_are_refused(cnn: TorchTask, images: Dataset) -> None:
    params = cnn.init_params(np.random.default_rng(0))
    missing = dict(params)
    del missing["0.bias"]
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        cnn.evaluate(missing, images)
    reshaped = dict(params)
    reshaped["0.bias"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(3,\).*\(16,\)"):
        cnn.train(reshaped, images, TrainConfig(), np.random.default_rng(0))


def test_empty_data_is_refused(cnn: TorchTask) -> None:
    empty = Dataset(x=np.zeros((0, 64), dtype=np.float32), y=np.zeros(0, dtype=np.int64))
    params = cnn.init_params(np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one example"):
        cnn.evaluate(params, empty)
    with pytest.raises(ValueError, match="at least one example"):
        cnn.train(params, empty, TrainConfig(), np.random.default_rng(0))


@pytest.mark.parametrize("input_shape", [(), (0, 8), (1, -8, 8)])
def test_bad_input_shape_is_refused(input_shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="input_shape"):
        TorchTask(
            name="t", model_fn=_mlp, loss_fn=nn.functional.cross_entropy, input_shape=input_shape
        )


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(UnknownNameError, match="optimizer 'adam'"):
        TorchTask(
            name="t",
            model_fn=_mlp,
            loss_fn=nn.functional.cross_entropy,
            optimizer="adam",  # type: ignore[arg-type]
        )


def test_empty_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="name"):
        TorchTask(name="", model_fn=_mlp, loss_fn=nn.functional.cross_entropy)

"""Torch tasks: any ``torch.nn.Module`` as a fedge task, and the built-in ``torch-cnn``.

:class:`TorchTask` adapts a module factory and a loss function to the
:class:`~fedge.tasks.base.Task` protocol. Params are the module's floating
``state_dict()`` entries in ``state_dict`` order: the weights, and also
floating buffers such as BatchNorm running statistics, so that they travel
with the model and are aggregated like any other tensor. Non-floating entries
(BatchNorm's ``num_batches_tracked`` counter) are not params; every call
starts them from the value a fresh module has. Tensors cross into numpy as
float32 copies, so neither side ever aliases the other's memory.

Local training is minibatch SGD with the FedProx proximal term
``mu / 2 * ||w - w_global||^2`` over the trainable weights (Li et al.,
"Federated Optimization in Heterogeneous Networks", MLSys 2020); with
``mu = 0`` it is the local step of FedAvg (McMahan et al., AISTATS 2017).

Tasks are pure (see DESIGN.md): every random draw comes from the numpy
generator passed in. A module's default initialisation and its dropout layers
draw from torch's global generator, so each call forks that generator, seeds
the fork from the numpy generator, and restores the global state on the way
out; the caller's torch random state is never disturbed. The fork is
process-wide, so one task object should not train on several threads at once.

This module imports torch at the top; :mod:`fedge.tasks` imports it only when
a torch task is asked for, so the agent runs without torch installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from fedge.data.dataset import Dataset, DataSpec
from fedge.errors import ConfigError, TaskError, UnknownNameError
from fedge.params import Params
from fedge.tasks.base import TrainConfig, TrainResult

__all__ = ["TorchTask", "cnn_task"]

# Examples per forward pass in evaluate: large enough to amortise the call
# overhead, small enough that activations stay a few MB on a small device.
_EVAL_BATCH = 1024
_OPTIMIZERS = ("sgd",)
# The seed of the torch generator under which train and evaluate build their
# throwaway module. Its weights are overwritten by the params at once; only
# non-floating buffers keep the values drawn here, and those take no draws.
_BUILD_SEED = 0


@contextmanager
def _seeded_torch_rng(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded to ``seed``, then restore it."""
    # devices=[]: fork only the CPU generator; fedge's torch tasks run on the CPU,
    # and forking every accelerator's state would be slow and would warn.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _torch_seed(rng: np.random.Generator) -> int:
    # 63 bits from the numpy generator: a full-width seed, never a 32-bit one.
    return int(rng.integers(2**63))


class TorchTask:
    """A fedge task over any ``torch.nn.Module``.

    Args:
        name: the task's name, used in error messages and reports.
        model_fn: builds a fresh module; called once per ``init_params``,
            ``train`` and ``evaluate`` under a seeded, forked torch generator.
        loss_fn: ``(logits, labels) -> scalar``, the mean loss over the batch
            (labels are int64), e.g. ``torch.nn.functional.cross_entropy``.
        input_shape: the shape of one example as the module expects it, e.g.
            ``(1, 8, 8)``; each batch of flat float32 features is reshaped to
            ``(batch, *input_shape)``. ``None`` passes ``(batch, num_features)``.
        optimizer: the local optimizer; only ``"sgd"`` (plain minibatch SGD).

    Raises:
        ConfigError: ``name`` is empty or ``input_shape`` holds a size < 1.
        UnknownNameError: ``optimizer`` is not a known optimizer.
    """

    def __init__(
        self,
        *,
        name: str,
        model_fn: Callable[[], nn.Module],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        input_shape: tuple[int, ...] | None = None,
        optimizer: Literal["sgd"] = "sgd",
    ) -> None:
        if not name:
            raise ConfigError("name must be a non-empty string, got ''")
        if input_shape is not None:
            input_shape = tuple(int(d) for d in input_shape)
            if not input_shape or min(input_shape) < 1:
                raise ConfigError(
                    f"input_shape must be a non-empty tuple of sizes >= 1, got {input_shape}"
                )
        if optimizer not in _OPTIMIZERS:
            raise UnknownNameError("optimizer", optimizer, list(_OPTIMIZERS))
        self.name = name
        self.model_fn = model_fn
        self.loss_fn = loss_fn
        self.input_shape = input_shape
        self.optimizer = optimizer

    def __repr__(self) -> str:
        return (
            f"TorchTask(name={self.name!r}, input_shape={self.input_shape!r}, "
            f"optimizer={self.optimizer!r})"
        )

    # -- the Task protocol ---------------------------------------------------

    def init_params(self, rng: np.random.Generator) -> Params:
        """The module's default initialisation, seeded from ``rng``: one seed, one model."""
        with _seeded_torch_rng(_torch_seed(rng)):
            model = self._build()
        return _params_of(model)

    def train(
        self, params: Params, data: Dataset, config: TrainConfig, rng: np.random.Generator
    ) -> TrainResult:
        """Minibatch SGD (FedProx when ``config.mu > 0``) from ``params`` on ``data``.

        The examples are shuffled by a fresh ``rng.permutation`` every epoch;
        the last batch of an epoch may be smaller. ``params`` is not modified.

        Returns:
            The trained params, ``len(data)`` as the example count, and
            ``train_loss``: the example-weighted mean of ``loss_fn`` over the
            last epoch (without the proximal term), taken before each step.

        Raises:
            ValueError: ``data`` is empty, or ``params`` does not match the
                module's names and shapes.
            TaskError: the module or the loss fails on the data (wrong feature
                count, wrong output shape, labels beyond the model's classes).
        """
        n = _check_nonempty(data)
        # The seed is drawn before the permutations so that one rng state fixes
        # both the dropout masks and the batch order.
        with _seeded_torch_rng(_torch_seed(rng)):
            model = self._build()
            _load(model, params)
            x, y = self._tensors(model, data)
            y_max = int(y.max())
            trainable = [p for p in model.parameters() if p.requires_grad]
            # FedProx anchors at the params the round started from.
            anchors = [p.detach().clone() for p in trainable] if config.mu > 0 else []
            model.train()
            epoch_loss = 0.0
            for _ in range(config.local_epochs):
                order = torch.from_numpy(rng.permutation(n)).to(x.device)
                total = 0.0
                for start in range(0, n, config.batch_size):
                    idx = order[start : start + config.batch_size]
                    _, loss = self._forward(model, x[idx], y[idx], y_max)
                    total += float(loss.detach()) * len(idx)
                    if not trainable:
                        continue
                    for p in trainable:
                        p.grad = None
                    self._backward(loss)
                    _sgd_step(trainable, anchors, lr=config.lr, mu=config.mu)
                epoch_loss = total / n
            new_params = _params_of(model)
        return TrainResult(params=new_params, num_examples=n, metrics={"train_loss": epoch_loss})

    def evaluate(self, params: Params, data: Dataset) -> dict[str, float]:
        """Mean loss and accuracy of ``params`` on ``data``, in eval mode, without gradients.

        Raises:
            ValueError: ``data`` is empty, or ``params`` does not fit the module.
            TaskError: the module or the loss fails on the data.
        """
        n = _check_nonempty(data)
        total_loss = 0.0
        correct = 0
        # Forked for the whole call: eval mode should draw nothing, but a
        # module's forward is user code and may, and the caller's state stays put.
        with _seeded_torch_rng(_BUILD_SEED), torch.no_grad():
            model = self._build()
            _load(model, params)
            model.eval()
            x, y = self._tensors(model, data)
            y_max = int(y.max())
            for start in range(0, n, _EVAL_BATCH):
                xb, yb = x[start : start + _EVAL_BATCH], y[start : start + _EVAL_BATCH]
                logits, loss = self._forward(model, xb, yb, y_max)
                total_loss += float(loss) * len(yb)
                correct += int((logits.argmax(dim=1) == yb).sum())
        return {"loss": total_loss / n, "accuracy": correct / n}

    # -- helpers -------------------------------------------------------------

    def _build(self) -> nn.Module:
        model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"task {self.name!r}: model_fn returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model

    def _tensors(self, model: nn.Module, data: Dataset) -> tuple[Tensor, Tensor]:
        """The whole dataset as tensors in the module's dtype and device, reshaped once."""
        like = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = like.dtype if like is not None else torch.float32
        device = like.device if like is not None else torch.device("cpu")
        # torch.tensor copies: the dataset's arrays may be read-only or shared.
        x = torch.tensor(data.x, dtype=dtype, device=device)
        y = torch.tensor(data.y, dtype=torch.int64, device=device)
        if self.input_shape is not None:
            try:
                x = x.reshape(x.shape[0], *self.input_shape)
            except RuntimeError as e:
                raise TaskError(
                    f"task {self.name!r}: examples of shape {tuple(data.x.shape[1:])} "
                    f"cannot be reshaped to input_shape {self.input_shape}"
                ) from e
        return x, y

    def _forward(
        self, model: nn.Module, xb: Tensor, yb: Tensor, y_max: int
    ) -> tuple[Tensor, Tensor]:
        """Logits and loss of one batch, with every failure named as the task's."""
        try:
            logits = model(xb)
        except (RuntimeError, ValueError) as e:
            raise TaskError(
                f"task {self.name!r}: the model failed on a batch of shape {tuple(xb.shape)}: {e}"
            ) from e
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != xb.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise TaskError(
                f"task {self.name!r}: the model must return logits of shape "
                f"(batch, num_classes) = ({xb.shape[0]}, C); for a batch of shape "
                f"{tuple(xb.shape)} it returned {got}"
            )
        if y_max >= logits.shape[1]:
            raise TaskError(
                f"task {self.name!r}: labels go up to {y_max} but the model returns "
                f"scores for {logits.shape[1]} classes"
            )
        try:
            loss = self.loss_fn(logits, yb)
        except (RuntimeError, ValueError, IndexError) as e:
            raise TaskError(
                f"task {self.name!r}: loss_fn failed on logits of shape "
                f"{tuple(logits.shape)} and labels of shape {tuple(yb.shape)}: {e}"
            ) from e
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TaskError(f"task {self.name!r}: loss_fn must return a scalar tensor, got {got}")
        return logits, loss

    def _backward(self, loss: Tensor) -> None:
        try:
            torch.autograd.backward(loss)
        except RuntimeError as e:
            raise TaskError(f"task {self.name!r}: backward pass failed: {e}") from e


def _check_nonempty(data: Dataset) -> int:
    n = len(data)
    if n == 0:
        raise ValueError("data must hold at least one example, got 0")
    return n


def _state_entries(model: nn.Module) -> dict[str, Tensor]:
    """The module's floating state, in ``state_dict`` order; these are its params."""
    return {
        name: t for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()
    }


def _params_of(model: nn.Module) -> Params:
    # .to() is a no-op for a float32 CPU tensor, so the copy below is the only one
    # and the params never alias the module's storage.
    return {
        name: np.array(t.detach().to(device="cpu", dtype=torch.float32).numpy(), copy=True)
        for name, t in _state_entries(model).items()
    }


def _load(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Copy ``params`` into ``model``'s state, checking names and shapes first.

    Raises:
        ValueError: names or shapes differ from the module's.
    """
    entries = _state_entries(model)
    if params.keys() != entries.keys():
        missing = [k for k in entries if k not in params]
        extra = [k for k in params if k not in entries]
        raise ValueError(f"params do not fit the model: missing {missing}, unexpected {extra}")
    for name, t in entries.items():
        shape = tuple(np.shape(params[name]))
        if shape != tuple(t.shape):
            raise ValueError(
                f"params do not fit the model: {name!r} has shape {shape}, "
                f"the model needs {tuple(t.shape)}"
            )
    with torch.no_grad():
        for name, t in entries.items():
            # torch.tensor copies (from_numpy would share, and warn on a read-only array).
            t.copy_(torch.tensor(np.asarray(params[name])))


def _sgd_step(
    trainable: list[nn.Parameter], anchors: list[Tensor], *, lr: float, mu: float
) -> None:
    """``w -= lr * (grad + mu * (w - w_global))``: SGD on the FedProx objective.

    ``mu * (w - w_global)`` is the gradient of ``mu / 2 * ||w - w_global||^2``;
    ``anchors`` is empty when ``mu == 0``. Written out rather than taken from
    ``torch.optim.SGD``, whose constructor imports ``torch._dynamo``: about 1.5 s
    on the first call in every process, a real cost on a small device.
    """
    with torch.no_grad():
        for i, p in enumerate(trainable):
            step = p.grad
            if anchors:
                pull = (p - anchors[i]) * mu
                # a weight the loss did not reach still feels the proximal pull
                step = pull if step is None else step + pull
            if step is not None:
                p.add_(step, alpha=-lr)


def _cnn(num_classes: int) -> nn.Module:
    """Two 3x3 convolutions and a linear head for 8x8 single-channel images."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )


def cnn_task(spec: DataSpec) -> TorchTask:
    """The built-in ``torch-cnn`` task: a small CNN over 8x8 images, cross-entropy loss.

    The task object pickles (its factory is a module-level function), so a
    simulator backend can send it to worker processes.

    Raises:
        ConfigError: ``spec`` does not describe 8x8 images (64 features).
    """
    if spec.num_features != 64:
        raise ConfigError(
            f"torch-cnn needs 8x8 single-channel images (64 features), "
            f"got {spec.num_features} features"
        )
    return TorchTask(
        name="torch-cnn",
        model_fn=functools.partial(_cnn, spec.num_classes),
        loss_fn=nn.functional.cross_entropy,
        input_shape=(1, 8, 8),
    )

"""Tasks: the Task protocol, built-in tasks, and the name registry.

Built-in names:

- ``logreg``: multinomial logistic regression (numpy);
- ``mlp`` or ``mlp:HIDDEN``: one hidden ReLU layer, default 512 units (numpy);
- ``torch-cnn``: a small CNN for 8x8 images (needs ``pip install 'fedge[torch]'``).

Any other name of the form ``module:attr`` is imported: ``attr`` is either a
Task object, or a class or factory that is called with the run's
:class:`~fedge.data.DataSpec` and returns one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from fedge.data.dataset import DataSpec
from fedge.errors import ConfigError, FedgeError, UnknownNameError
from fedge.tasks.base import Task, TrainConfig, TrainResult
from fedge.tasks.numpy_tasks import MLP, LogReg

__all__ = ["BUILTIN_TASKS", "MLP", "LogReg", "Task", "TrainConfig", "TrainResult", "load_task"]


def _torch_cnn(spec: DataSpec) -> Task:
    try:
        from fedge.tasks.torch_task import cnn_task
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ConfigError(
            "task 'torch-cnn' needs PyTorch, which is not installed; "
            "install it with: pip install 'fedge[torch]'"
        ) from e
    return cnn_task(spec)


def _mlp(spec: DataSpec, arg: str | None) -> Task:
    if arg is None:
        return MLP(spec)
    try:
        hidden = int(arg)
    except ValueError:
        raise ConfigError(f"task 'mlp:{arg}': hidden size must be an integer, got {arg!r}") from None
    return MLP(spec, hidden=hidden)


BUILTIN_TASKS: dict[str, Callable[[DataSpec, str | None], Task]] = {
    "logreg": lambda spec, _arg: LogReg(spec),
    "mlp": _mlp,
    "torch-cnn": lambda spec, _arg: _torch_cnn(spec),
}
_TAKES_ARG = {"mlp"}


def load_task(name: str, spec: DataSpec) -> Task:
    """Build the task called ``name`` for data of shape ``spec``.

    Raises:
        UnknownNameError: ``name`` is neither built in nor ``module:attr``.
        ConfigError: the module or attribute cannot be imported, or what it
            names is not a task.
    """
    base, sep, arg = name.partition(":")
    if base in BUILTIN_TASKS:
        if sep and base not in _TAKES_ARG:
            raise ConfigError(f"task {base!r} takes no argument, got {name!r}")
        return BUILTIN_TASKS[base](spec, arg if sep else None)
    if not sep or not base or not arg:
        raise UnknownNameError("task", name, [*BUILTIN_TASKS, "module:attr"])
    return _import_task(base, arg, spec)


def _import_task(module_name: str, attr: str, spec: DataSpec) -> Task:
    label = f"{module_name}:{attr}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"task {label!r}: cannot import module {module_name!r} ({e})") from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"task {label!r}: module {module_name!r} has no attribute {attr!r}") from None
    # A class has init_params/train/evaluate attributes too, so it would pass
    # the protocol check: call classes and other factories with the spec.
    if isinstance(obj, type) or (not isinstance(obj, Task) and callable(obj)):
        try:
            obj = obj(spec)
        except FedgeError:
            raise
        except Exception as e:
            raise ConfigError(f"task {label!r}: building it failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Task):
        raise ConfigError(
            f"task {label!r} is not a task: it needs init_params, train and evaluate methods"
        )
    return obj

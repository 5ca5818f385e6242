"""The fedge exception tree.

Every error fedge raises on purpose derives from :class:`FedgeError`, so a
caller can catch one level of the tree and nothing else::

    FedgeError
    ├── ConfigError        (also a ValueError) a setting or argument is invalid
    │   ├── UnknownNameError   a task, strategy, data or partitioner name is unknown
    │   └── DataError          a data source is malformed or does not fit the run
    ├── TaskError          user task code failed or returned something malformed
    ├── RoundError         the round logic refused an event (late, duplicate, not invited)
    ├── ProtocolError      a message or payload from the other side is malformed or refused
    ├── TransportError     the other side cannot be reached or answered with a server error
    ├── StoreError         the coordinator's store is unreadable, corrupt or of another run
    ├── CoordinatorError   the coordinator's round driver failed (restart: it resumes from the store)
    ├── PrivacyBudgetError the next round would spend more privacy than the (epsilon, delta) budget
    └── BackendError       a simulator backend or worker process failed

``ConfigError`` subclasses ``ValueError`` so that plain Python callers that
expect argument errors to be ``ValueError`` keep working; the CLI maps every
``ConfigError`` to exit status 2 with its message on one line.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "CoordinatorError",
    "DataError",
    "FedgeError",
    "PrivacyBudgetError",
    "ProtocolError",
    "RoundError",
    "StoreError",
    "TaskError",
    "TransportError",
    "UnknownNameError",
]


class FedgeError(Exception):
    """Base class of every error fedge raises on purpose."""


class ConfigError(FedgeError, ValueError):
    """A setting or argument is invalid; the message names it and the value received."""


class UnknownNameError(ConfigError):
    """A registry lookup (task, strategy, data, partitioner) found no such name."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")


class DataError(ConfigError):
    """A data source is malformed (bad cell, NaN, wrong shape) or cannot serve the run."""


class TaskError(FedgeError):
    """A task's code raised or returned something that breaks the task contract."""


class RoundError(FedgeError):
    """The round state machine refused an event; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class BackendError(FedgeError):
    """A simulator backend failed: a worker died or raised."""


class ProtocolError(FedgeError):
    """A message or payload was refused; ``reason`` is the stable code sent as ``error``.

    ``status`` is the HTTP status the coordinator answers with (a 4xx: the
    sender is at fault). On the agent side the same class carries a refusal
    the coordinator sent back.
    """

    def __init__(self, reason: str, detail: str, status: int = 400) -> None:
        self.reason = reason
        self.detail = detail
        self.status = status
        super().__init__(f"{reason}: {detail}")


class TransportError(FedgeError):
    """The coordinator could not be reached, or answered with a server error (retry later)."""


class StoreError(FedgeError):
    """The store cannot be used: corrupt, a checkpoint missing or altered, or another run's data."""


class CoordinatorError(FedgeError):
    """The coordinator's round driver failed; everything up to the last complete round is in the store."""


class PrivacyBudgetError(FedgeError):
    """The next round would spend more privacy than the budget allows; no round is started.

    ``spent`` is the epsilon spent so far and ``would_be`` the epsilon after
    one more round, both at ``delta``.
    """

    def __init__(self, *, budget: float, spent: float, would_be: float, delta: float) -> None:
        self.budget = budget
        self.spent = spent
        self.would_be = would_be
        self.delta = delta
        super().__init__(
            f"privacy budget reached: epsilon spent {spent:.4g} of {budget:.4g} at delta {delta:g}; "
            f"one more round would make it {would_be:.4g}, so no further round runs"
        )

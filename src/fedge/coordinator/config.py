"""The coordinator's configuration: one frozen value read from ``coordinator.toml``.

The file has up to eight tables; every key is optional except the task's shape
(given directly or read from ``eval_data``)::

    [task]
    name = "logreg"            # logreg, mlp, mlp:HIDDEN, torch-cnn or module:attr
    num_features = 64          # or eval_data = "test.npz": shape read from it,
    num_classes = 10           #   and the model evaluated on it after each round

    [strategy]
    name = "fedavg"            # any simulator strategy, e.g. "trimmed-mean:0.2", "norm-bound:1"
    options = { server_lr = 1.0 }  # a robust rule's f: { f = 2 } (malicious devices per round)

    [rounds]
    count = 20                 # rounds to complete
    cohort_size = 8            # updates a round waits for before closing early
    min_updates = 8            # fewer than this by the deadline: abandoned, retried
    over_selection = 1.0       # invite ceil(cohort_size * over_selection) devices
    deadline_s = 120.0
    wait_s = 5.0               # how long an idle device waits between check-ins
    selection = "random"       # or "deadline": prefer devices expected to finish in time
    fairness = 0.2             # with "deadline": share of places for the longest-waiting devices

    [train]
    local_epochs = 1
    batch_size = 32
    lr = 0.1

    [server]
    host = "127.0.0.1"
    port = 8080
    data_dir = "fedge-data"    # the store, the CA (ca/), the server certificate (tls/)
    max_body_mb = 256

    [encoding]                 # how devices encode updates (docs/compression.md)
    compress = "none"          # none, fp16, q8, q4, topk:FRACTION, topk:FRACTION+fp16|q8|q4
    bucket_size = 512          # q8/q4: one scale per this many values (default: per tensor)
    shared_range = 0.1         # q8/q4: a shared grid [-R, R] instead of per-device scales
    [privacy]                  # differential privacy (docs/privacy.md); absent: off
    mode = "central"           # or "local" (each device noises its own update), or
                               #   "distributed" (with [secagg]: devices add shares of the noise)
    clip_norm = 1.0            # or "adaptive"
    noise_multiplier = 1.0     # or target_epsilon = 3.0 (calibrated for rounds.count)
    delta = 1e-5
    budget = 3.0               # epsilon no round may take the run past
    accountant = "rdp"         # or "pld"

    [secagg]                   # secure aggregation, SecAgg+ (docs/secagg.md); absent: off
    enabled = true
    k = 8                      # neighbours per device (default: from the cohort size)
    threshold = 5              # shares that rebuild a secret (default: k/2 + 1)
    clip = 1.0                 # every value of an update clipped to [-clip, clip]
    bits = 24                  # signed bits per value on the shared grid (default: the most that fits)
    max_weight = 1000          # the largest example weight (default: the cohort's largest)
    dropout_rate = 0.1         # the dropout rate k is chosen for
    advertise_s = 15.0         # how long each phase may last: keys from the round's opening,
    share_s = 10.0             #   shares from the keys' end, unmasking from the upload's end
    unmask_s = 10.0            #   (the upload itself ends rounds.deadline_s after the opening)
    poll_s = 1.0               # how often devices ask whether a phase has closed

    [security]
    cert_days = 30             # validity of the client certificates issued at enrolment
    insecure = false           # plain HTTP, devices named by a header: loopback only...
    insecure_allow_remote = false  # ...unless this is also set

Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.encoding import EncodingConfig, Pipeline, build_pipeline
from fedge.encoding.fixedpoint import FixedPoint, max_bits
from fedge.errors import ConfigError
from fedge.rounds import SELECTIONS
from fedge.sim.config import coerce_fields, load_toml
from fedge.strategies import build_strategy, check_cohort, check_secure_aggregation, min_updates

if TYPE_CHECKING:
    from fedge.privacy.session import PrivacyConfig

__all__ = ["CoordinatorConfig", "load_coordinator_config"]

# TOML table -> {key in the table: field name}.
_TABLES: dict[str, dict[str, str]] = {
    "task": {
        "name": "task",
        "num_features": "num_features",
        "num_classes": "num_classes",
        "eval_data": "eval_data",
    },
    "strategy": {"name": "strategy", "options": "strategy_options", "mu": "mu"},
    "rounds": {
        "count": "rounds",
        "cohort_size": "cohort_size",
        "min_updates": "min_updates",
        "over_selection": "over_selection",
        "deadline_s": "deadline_s",
        "wait_s": "wait_s",
        "min_devices": "min_devices",
        "eval_every": "eval_every",
        "selection": "selection",
        "fairness": "fairness",
    },
    "train": {"local_epochs": "local_epochs", "batch_size": "batch_size", "lr": "lr"},
    "server": {
        "host": "host",
        "port": "port",
        "data_dir": "data_dir",
        "max_body_mb": "max_body_mb",
        "seed": "seed",
    },
    "encoding": {
        "compress": "compress",
        "bucket_size": "compress_bucket",
        "shared_range": "compress_range",
    },
    "privacy": {
        "mode": "dp",
        "clip_norm": "clip_norm",
        "noise_multiplier": "noise_multiplier",
        "target_epsilon": "target_epsilon",
        "delta": "delta",
        "budget": "epsilon_budget",
        "accountant": "accountant",
    },
    "secagg": {
        "enabled": "secagg",
        "k": "secagg_k",
        "threshold": "secagg_threshold",
        "clip": "secagg_clip",
        "bits": "secagg_bits",
        "max_weight": "secagg_max_weight",
        "dropout_rate": "secagg_dropout_rate",
        "advertise_s": "secagg_advertise_s",
        "share_s": "secagg_share_s",
        "unmask_s": "secagg_unmask_s",
        "poll_s": "secagg_poll_s",
    },
    "security": {
        "insecure": "insecure",
        "insecure_allow_remote": "insecure_allow_remote",
        "cert_days": "cert_days",
    },
}


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything that defines a coordinator; see the module docstring for the file.

    ``min_updates`` defaults to ``cohort_size``; ``min_devices`` (devices that
    must have checked in before a round opens) defaults to ``min_updates``.
    """

    task: str = "logreg"
    num_features: int | None = None
    num_classes: int | None = None
    eval_data: str | None = None
    strategy: str = "fedavg"
    strategy_options: Mapping[str, float] = field(default_factory=dict)
    mu: float | None = None
    rounds: int = 20
    cohort_size: int = 8
    min_updates: int | None = None
    over_selection: float = 1.0
    deadline_s: float = 120.0
    wait_s: float = 5.0
    min_devices: int | None = None
    eval_every: int = 1
    selection: str = "random"
    fairness: float = 0.2
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "fedge-data"
    max_body_mb: float = 256.0
    seed: int = 0
    insecure: bool = False
    insecure_allow_remote: bool = False
    cert_days: int = 30
    compress: str = "none"
    compress_bucket: int | None = None
    compress_range: float | None = None
    dp: str | None = None
    clip_norm: float | str | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    epsilon_budget: float | None = None
    accountant: str | None = None
    secagg: bool = False
    secagg_k: int | None = None
    secagg_threshold: int | None = None
    secagg_clip: float | None = None
    secagg_bits: int | None = None
    secagg_max_weight: int | None = None
    secagg_dropout_rate: float | None = None
    secagg_advertise_s: float | None = None
    secagg_share_s: float | None = None
    secagg_unmask_s: float | None = None
    secagg_poll_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("rounds", "cohort_size", "eval_every", "local_epochs", "batch_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("num_features", "min_updates", "min_devices"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.num_classes is not None:
            _at_least("num_classes", self.num_classes, 2)
        _at_least("seed", self.seed, 0)
        _at_least("cert_days", self.cert_days, 1)
        if self.insecure_allow_remote and not self.insecure:
            raise ConfigError(
                "security.insecure_allow_remote only applies with security.insecure (plain HTTP)"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be between 0 and 65535, got {self.port}")
        if self.min_updates is not None and self.min_updates > self.cohort_size:
            raise ConfigError(
                f"rounds.min_updates ({self.min_updates}) cannot exceed rounds.cohort_size "
                f"({self.cohort_size})"
            )
        for name in ("deadline_s", "wait_s", "lr", "max_body_mb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        if self.selection not in SELECTIONS:
            raise ConfigError(
                f"rounds.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        if not (math.isfinite(self.fairness) and 0 <= self.fairness <= 1):
            raise ConfigError(f"rounds.fairness must be between 0 and 1, got {self.fairness}")
        if not (math.isfinite(self.over_selection) and 1 <= self.over_selection <= 10):
            raise ConfigError(f"rounds.over_selection must be between 1 and 10, got {self.over_selection}")
        if self.mu is not None and not (math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"strategy.mu must be a finite number >= 0, got {self.mu}")
        self.encoding_pipeline()  # refuses a bad [encoding] table at start-up
        if self.eval_data is None and (self.num_features is None or self.num_classes is None):
            raise ConfigError(
                "task.num_features and task.num_classes are required unless task.eval_data names "
                "a data file to read them from"
            )
        _check_strategy(self)
        self.privacy  # noqa: B018 - checks the [privacy] table now
        _check_secagg(self)

    @property
    def privacy(self) -> PrivacyConfig | None:
        """The ``[privacy]`` settings, or ``None`` without a ``privacy.mode``."""
        names = ("clip_norm", "noise_multiplier", "target_epsilon", "delta", "epsilon_budget", "accountant")
        given = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.dp is None:
            if given:
                raise ConfigError("the [privacy] settings need privacy.mode (central)")
            return None
        if self.dp == "distributed" and not self.secagg:
            raise ConfigError("privacy.mode = 'distributed' needs secure aggregation ([secagg] enabled = "
                              "true): the devices' noise shares protect them only if the coordinator sees "
                              "nothing but their sum; enable [secagg], or use privacy.mode = 'central' "
                              "or 'local'")
        from fedge.privacy.session import PrivacyConfig

        if "epsilon_budget" in given:
            given["budget"] = given.pop("epsilon_budget")
        try:
            return PrivacyConfig(mode=self.dp, **given)
        except ConfigError as e:  # the flags' names mean nothing in a TOML file
            raise ConfigError(f"[privacy]: {e}".replace("--epsilon-budget", "budget")
                              .replace("--dp", "mode").replace("--", "")) from None

    @property
    def effective_min_updates(self) -> int:
        return self.cohort_size if self.min_updates is None else self.min_updates

    @property
    def effective_min_devices(self) -> int:
        return self.effective_min_updates if self.min_devices is None else self.min_devices

    @property
    def invite_count(self) -> int:
        """Devices invited per round: the cohort size times the over-selection factor."""
        return math.ceil(self.cohort_size * self.over_selection - 1e-9)

    @property
    def encoding(self) -> EncodingConfig:
        """The ``[encoding]`` table: how devices encode their updates."""
        return EncodingConfig(self.compress, self.compress_bucket, self.compress_range)

    def encoding_pipeline(self) -> Pipeline:
        """The pipeline the coordinator decodes updates with."""
        return build_pipeline(self.encoding, secure_aggregation=self.secagg)

    @property
    def secagg_clip_value(self) -> float:
        """``[secagg] clip``; by default 1.0, or the DP clip norm if larger (an update clipped to an
        L2 norm C has no value beyond C, so the grid then clips nothing more)."""
        if self.secagg_clip is not None:
            return float(self.secagg_clip)
        return max(1.0, self.clip_norm) if isinstance(self.clip_norm, int | float) else 1.0

    @property
    def secagg_poll_value(self) -> float:
        """``[secagg] poll_s``; by default the check-in period, at most 1 s."""
        return float(self.secagg_poll_s) if self.secagg_poll_s is not None else min(1.0, self.wait_s)

    @property
    def secagg_phases_s(self) -> tuple[float, float, float]:
        """The advertise, share and unmask phases' lengths, in seconds.

        By default an invited device has three check-in periods (10 s at least) to hear
        of the round and advertise keys, and 10 s for each of sharing and unmasking,
        each key phase at most a quarter of ``rounds.deadline_s`` (the upload's deadline).
        """
        advertise = self.secagg_advertise_s
        if advertise is None:
            advertise = min(max(10.0, 3 * self.wait_s), self.deadline_s / 4)
        share = self.secagg_share_s if self.secagg_share_s is not None else min(10.0, self.deadline_s / 4)
        unmask = self.secagg_unmask_s if self.secagg_unmask_s is not None else 10.0
        return float(advertise), float(share), float(unmask)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def replace(self, **changes: Any) -> CoordinatorConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["strategy_options"] = dict(self.strategy_options)
        return d


def _check_strategy(config: CoordinatorConfig) -> None:
    """Build the strategy once so a bad name or option, or a robust rule's condition on
    malicious devices that the round sizes break, fails at load and not at round 1.

    A round is aggregated from as few as ``min_updates`` updates, so that is
    the ``n`` the rule's f-condition must hold for; ``min_devices`` must allow
    a cohort that large too.
    """
    options = dict(config.strategy_options)
    if config.strategy == "fedprox" and config.mu is not None:
        options["mu"] = config.mu
    strategy = build_strategy(config.strategy, options)
    n = config.effective_min_updates
    check_cohort(strategy, n, what=f"rounds.min_updates (a round may close with {n} updates)")
    need = min_updates(strategy)
    if config.effective_min_devices < need:
        raise ConfigError(
            f"rounds.min_devices ({config.effective_min_devices}) must be at least the {need} "
            f"updates strategy {config.strategy} needs per round"
        )


_SECAGG_OPTIONS = ("secagg_k", "secagg_threshold", "secagg_clip", "secagg_bits", "secagg_max_weight",
                   "secagg_dropout_rate", "secagg_advertise_s", "secagg_share_s", "secagg_unmask_s",
                   "secagg_poll_s")


def _check_secagg(config: CoordinatorConfig) -> None:
    """Refuse a ``[secagg]`` table that cannot work, before any round (docs/secagg.md).

    A strategy that needs every update, an encoding that is not summable on the
    shared grid, adaptive clipping (its count is per device), a round that may
    hold fewer than 3 updates, a ``k``/``threshold`` that no cohort size the
    rounds allow accepts, and a grid whose sum could wrap around 2^32.
    """
    given = [f"secagg.{_key_of('secagg', name)}" for name in _SECAGG_OPTIONS
             if getattr(config, name) is not None]
    if not config.secagg:
        if given:
            raise ConfigError(f"{', '.join(given)} need secagg.enabled = true")
        return
    options = dict(config.strategy_options)
    if config.strategy == "fedprox" and config.mu is not None:
        options["mu"] = config.mu
    strategy = build_strategy(config.strategy, options)
    try:
        check_secure_aggregation(strategy)
    except ConfigError as e:
        raise ConfigError(f"[secagg]: {e}") from None
    if getattr(strategy, "needs_every_update", False):
        raise ConfigError(f"[secagg] cannot be used with strategy {config.strategy!r}: it keeps every "
                          "update, and secure aggregation reveals only their sum")
    if not config.encoding_pipeline().identity:
        raise ConfigError(
            f"[encoding] compress = {config.compress!r} cannot be combined with [secagg]: a secure "
            "round encodes updates on its shared fixed-point grid and sends only the bits the sum "
            "needs ([secagg] bits); set compress = \"none\""
        )
    privacy = config.privacy
    if privacy is not None and privacy.adaptive:
        raise ConfigError("privacy.clip_norm = 'adaptive' cannot be combined with [secagg]: adaptive "
                          "clipping counts which updates were clipped, and the coordinator sees no "
                          "single update; give a fixed clip_norm")
    low, high = config.effective_min_updates, config.invite_count
    if low < 3:
        raise ConfigError(f"[secagg] needs at least 3 updates in every round (fewer reveal each other's "
                          f"inputs); rounds.min_updates is {low}")
    k, t = config.secagg_k, config.secagg_threshold
    if k is not None and (isinstance(k, bool) or k < 2 or (k % 2 and k < high - 1)):
        raise ConfigError(f"secagg.k must be an even number >= 2 (or at least the {high - 1} other "
                          f"devices of a full cohort: the complete graph), got {k!r}")
    if t is not None and (isinstance(t, bool) or t < 2):
        raise ConfigError(f"secagg.threshold must be >= 2, got {t!r}")
    rate = config.secagg_dropout_rate
    if rate is not None and not (math.isfinite(rate) and 0 <= rate < 1):
        raise ConfigError(f"secagg.dropout_rate must be in [0, 1), got {rate}")
    from fedge.coordinator.secagg import secagg_parameters

    for n in sorted({low, high}):
        secagg_parameters(n, k=k, threshold=t, dropout_rate=rate)
    clip = config.secagg_clip_value
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"secagg.clip must be a positive number, got {clip}")
    bits, weight = config.secagg_bits, config.secagg_max_weight
    if bits is not None and (isinstance(bits, bool) or not 2 <= bits <= 32):
        raise ConfigError(f"secagg.bits must be between 2 and 32, got {bits!r}")
    if weight is not None and (isinstance(weight, bool) or weight < 1):
        raise ConfigError(f"secagg.max_weight must be >= 1, got {weight!r}")
    try:  # the largest cohort a round may invite must not wrap the sum
        FixedPoint(clip=clip, bits=bits if bits is not None else min(max_bits(high), 24),
                   max_weight=weight if weight is not None else 1, cohort_size=high)
    except ConfigError as e:
        raise ConfigError(f"[secagg] with up to {high} devices a round: {e}".replace("--secagg-bits", "bits")
                          ) from None
    for name in ("secagg_advertise_s", "secagg_share_s", "secagg_unmask_s", "secagg_poll_s"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"secagg.{_key_of('secagg', name)} must be a positive number, got {value}")
    advertise, share, _ = config.secagg_phases_s
    if advertise + share >= config.deadline_s:
        raise ConfigError(
            f"secagg.advertise_s + secagg.share_s ({advertise + share:g} s) must end before the upload "
            f"deadline, rounds.deadline_s ({config.deadline_s:g} s), leaving time to train"
        )


def _key_of(table: str, field_name: str) -> str:
    return next(k for k, v in _TABLES[table].items() if v == field_name)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def load_coordinator_config(
    path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> CoordinatorConfig:
    """Read ``path`` (may be ``None``: defaults) and apply ``overrides`` (field names).

    Raises:
        ConfigError: the file is missing or malformed, a table or key is
            unknown, a value has the wrong type or is out of range.
    """
    values: dict[str, Any] = {}
    source = "coordinator config"
    base = Path.cwd()
    if path is not None:
        source = str(path)
        base = Path(path).resolve().parent
        raw = load_toml(path)
        for table, entries in raw.items():
            if table not in _TABLES:
                raise ConfigError(f"{source}: unknown table [{table}]; known: {', '.join(_TABLES)}")
            if not isinstance(entries, Mapping):
                raise ConfigError(f"{source}: {table} must be a table, got {entries!r}")
            for key, value in entries.items():
                if key not in _TABLES[table]:
                    raise ConfigError(
                        f"{source}: unknown key {table}.{key}; known: {', '.join(_TABLES[table])}"
                    )
                values[_TABLES[table][key]] = value
    fields = coerce_fields(CoordinatorConfig, values, source=source)
    for key in ("data_dir", "eval_data"):
        if isinstance(fields.get(key), str):
            fields[key] = (
                str((base / fields[key]).resolve()) if not Path(fields[key]).is_absolute() else fields[key]
            )
    fields.update(coerce_fields(CoordinatorConfig, dict(overrides or {}), source="command line"))
    return CoordinatorConfig(**fields)

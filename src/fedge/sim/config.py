"""The simulator's configuration: one frozen value, from defaults, a TOML file and flags.

Precedence is defaults < ``--config FILE.toml`` < command-line flags. Every
field is checked here for what can be checked without loading anything;
names (task, data, strategy, partitioner) are checked when the run is built.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.encoding import EncodingConfig, Pipeline, build_pipeline
from fedge.errors import ConfigError

if typing.TYPE_CHECKING:
    from fedge.privacy.session import PrivacyConfig

__all__ = ["BACKENDS", "RAY_ON_FAILURE", "SimConfig", "coerce_fields", "load_toml"]

BACKENDS = ("inline", "processes", "ray", "auto")
RAY_ON_FAILURE = ("retry", "dropout")
# What the simulator counts as a payload's size (fedge.sim.traffic.COUNT_BYTES;
# repeated here so that the config module imports no codec).
COUNT_BYTES = ("wire", "raw", "off")
_DP_FIELDS = ("clip_norm", "noise_multiplier", "target_epsilon", "delta", "epsilon_budget", "accountant")


@dataclass(frozen=True)
class SimConfig:
    """Everything that defines a simulation run; ``summary.json`` records it resolved.

    ``None`` means "the default for this data/strategy": ``devices`` is 20
    (synthetic data brings its own 30), ``partition`` is ``dirichlet:0.5``,
    ``mu`` and ``server_lr`` come from the strategy.
    """

    task: str = "logreg"
    data: str = "digits"
    partition: str | None = None
    devices: int | None = None
    cohort: int | None = None
    sample_rate: float | None = None
    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    strategy: str = "fedavg"
    mu: float | None = None
    server_lr: float | None = None
    strategy_options: Mapping[str, float] = field(default_factory=dict)
    stragglers: float = 0.0
    drop_stragglers: bool = False
    backend: str = "inline"
    workers: int | None = None
    ray_address: str | None = None
    ray_cpus_per_device: float = 1.0
    ray_on_failure: str = "retry"
    eval_every: int = 1
    seed: int = 0
    attack: str | None = None
    malicious: float = 0.0
    compress: str = "none"
    compress_bucket: int | None = None
    compress_range: float | None = None
    count_bytes: str = "wire"
    # Device heterogeneity and the virtual clock (sim/profiles.py).
    profiles: str | None = None
    deadline_s: float | None = None
    selection: str = "random"
    fairness: float = 0.2
    # Differential privacy (docs/privacy.md); None: off.
    dp: str | None = None
    clip_norm: float | str | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    epsilon_budget: float | None = None
    accountant: str | None = None
    dp_min_contributors: int | None = None  # --dp distributed: shares each device's noise assumes
    secagg: bool = False
    secagg_k: int | None = None
    secagg_threshold: int | None = None
    secagg_clip: float = 1.0
    secagg_bits: int | None = None
    secagg_dropout: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Types first (the API can pass anything), then ranges.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name], "SimConfig")
            object.__setattr__(self, f.name, value)
        _check_int("rounds", self.rounds, low=1)
        _check_int("local_epochs", self.local_epochs, low=1)
        _check_int("batch_size", self.batch_size, low=1)
        _check_int("eval_every", self.eval_every, low=1)
        _check_int("seed", self.seed, low=0, high=2**63 - 1)
        if self.devices is not None:
            _check_int("devices", self.devices, low=1)
        if self.cohort is not None:
            _check_int("cohort", self.cohort, low=1)
        if self.workers is not None:
            _check_int("workers", self.workers, low=1)
        if self.cohort is not None and self.sample_rate is not None:
            raise ConfigError("--cohort and --sample-rate exclude each other; set one")
        if self.sample_rate is not None and not (
            math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1
        ):
            raise ConfigError(f"--sample-rate must be in (0, 1], got {self.sample_rate}")
        _check_positive("lr", self.lr)
        if self.server_lr is not None:
            _check_positive("server_lr", self.server_lr)
        if self.mu is not None and not (math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"--mu must be a finite number >= 0, got {self.mu}")
        if not (math.isfinite(self.stragglers) and 0 <= self.stragglers <= 1):
            raise ConfigError(f"--stragglers must be a fraction in [0, 1], got {self.stragglers}")
        if self.stragglers > 0 and self.local_epochs < 2:
            raise ConfigError(
                "--stragglers needs --local-epochs >= 2: a straggler runs fewer epochs "
                f"than the others, and {self.local_epochs} leaves none to drop"
            )
        if self.deadline_s is not None and not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ConfigError(f"--deadline-s must be a positive number of seconds, got {self.deadline_s}")
        if self.deadline_s is not None and self.profiles is None:
            raise ConfigError("--deadline-s needs --profiles: without device speeds no round has a duration")
        if self.selection not in ("random", "deadline"):
            raise ConfigError(f"--selection must be random or deadline, got {self.selection!r}")
        if self.selection == "deadline" and self.deadline_s is None:
            raise ConfigError("--selection deadline needs --deadline-s (and --profiles)")
        if not (math.isfinite(self.fairness) and 0 <= self.fairness <= 1):
            raise ConfigError(f"--fairness must be in [0, 1], got {self.fairness}")
        _check_positive("secagg_clip", self.secagg_clip)
        if self.secagg_bits is not None:
            _check_int("secagg_bits", self.secagg_bits, low=2, high=32)
        if not self.secagg and (self.secagg_k is not None or self.secagg_threshold is not None
                                or self.secagg_bits is not None or self.secagg_dropout):
            raise ConfigError("--secagg-k, --secagg-threshold, --secagg-bits and "
                              "--secagg-dropout need --secagg")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        self._check_ray()
        _check_attack(self.attack, self.malicious)
        if self.count_bytes not in COUNT_BYTES:
            raise ConfigError(
                f"--count-bytes must be one of {', '.join(COUNT_BYTES)}, got {self.count_bytes!r}"
            )
        self.encoding_pipeline()  # refuses a bad --compress now, before any data is loaded
        self.privacy  # noqa: B018 - checks the DP settings now, before any round
        if self.dp == "distributed" and not self.secagg:
            raise ConfigError(
                "--dp distributed needs secure aggregation (--secagg): the devices' noise shares "
                "protect them only if the coordinator sees nothing but their sum; add --secagg, "
                "or use --dp central or --dp local"
            )
        if self.dp_min_contributors is not None:
            if self.dp != "distributed":
                raise ConfigError("--dp-min-contributors needs --dp distributed")
            _check_int("dp_min_contributors", self.dp_min_contributors, low=1)

    def _check_ray(self) -> None:
        if self.ray_address is not None and self.backend not in ("ray", "auto"):
            raise ConfigError(
                f"--ray-address needs --backend ray (or auto), not --backend {self.backend}"
            )
        if self.ray_address is not None and not _is_ray_address(self.ray_address):
            raise ConfigError(f"--ray-address must be 'auto' or HOST:PORT, got {self.ray_address!r}")
        if not (math.isfinite(self.ray_cpus_per_device) and 0 < self.ray_cpus_per_device <= 1024):
            raise ConfigError(
                f"--ray-cpus-per-device must be a number in (0, 1024], got {self.ray_cpus_per_device}"
            )
        if self.ray_on_failure not in RAY_ON_FAILURE:
            raise ConfigError(
                f"--ray-on-failure must be one of {', '.join(RAY_ON_FAILURE)}, "
                f"got {self.ray_on_failure!r}"
            )

    @property
    def encoding(self) -> EncodingConfig:
        """The update encoding (``--compress`` and its options)."""
        return EncodingConfig(self.compress, self.compress_bucket, self.compress_range)

    def encoding_pipeline(self) -> Pipeline:
        """The encoding pipeline, checked against the run's other settings."""
        # No simulator setting turns on secure aggregation yet; when one does,
        # it is passed here so that the pipeline refuses what breaks sums.
        return build_pipeline(self.encoding, secure_aggregation=False)

    @property
    def privacy(self) -> PrivacyConfig | None:
        """The DP settings, or ``None`` when ``dp`` is off (then no DP flag may be set)."""
        given = {name: getattr(self, name) for name in _DP_FIELDS if getattr(self, name) is not None}
        if self.dp is None:
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise ConfigError(f"{flags} need --dp central|distributed|local")
            return None
        from fedge.privacy.session import PrivacyConfig

        if "epsilon_budget" in given:
            given["budget"] = given.pop("epsilon_budget")
        return PrivacyConfig(mode=self.dp, **given)

    def replace(self, **changes: Any) -> SimConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["strategy_options"] = dict(self.strategy_options)
        d["secagg_dropout"] = dict(self.secagg_dropout)
        return d

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str) -> SimConfig:
        """Build a config from a mapping of field names (``-`` or ``_``) to values.

        Raises:
            ConfigError: an unknown key or a value of the wrong type, naming ``source``.
        """
        return cls(**coerce_fields(cls, values, source=source))


def _is_ray_address(text: str) -> bool:
    if text == "auto":
        return True
    host, sep, port = text.rpartition(":")
    return bool(sep and host.strip("[]") and port.isascii() and port.isdigit()
                and 1 <= int(port) <= 65535 and not any(c.isspace() or c == "/" for c in host))


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{flag} must be {bound}, got {value}")


def _check_attack(attack: str | None, malicious: float) -> None:
    from fedge.sim.attacks import parse_attack

    if not (math.isfinite(malicious) and 0 <= malicious < 1):
        raise ConfigError(f"--malicious must be a fraction in [0, 1), got {malicious}")
    if attack is None and malicious > 0:
        raise ConfigError("--malicious needs --attack: say what the malicious devices do")
    if attack is not None:
        parse_attack(attack)
        if malicious == 0:
            raise ConfigError("--attack needs --malicious FRACTION > 0: the share of devices "
                              "that attack")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def coerce_fields(cls: type, values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Check ``values`` against dataclass ``cls``'s fields and their types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in names:
            raise ConfigError(
                f"{source}: unknown setting {raw_key!r}; known: {', '.join(sorted(names))}"
            )
        out[key] = _coerce(key, value, hints[key], source)
    return out


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        origin = typing.get_origin(t) or t
        if origin is bool and isinstance(value, bool | np.bool_):
            return bool(value)
        if origin is int and isinstance(value, int | np.integer) and not isinstance(value, bool):
            return int(value)
        if origin is float and isinstance(value, int | float | np.integer | np.floating) and not (
            isinstance(value, bool)
        ):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin in (Mapping, dict) and isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
                    raise ConfigError(f"{source}: {key}.{k} must be a number, got {v!r}")
            return {str(k): float(v) for k, v in value.items()}
    wanted = " or ".join(getattr(t, "__name__", str(t)) for t in options if t is not type(None))
    raise ConfigError(f"{source}: {key} must be {wanted}, got {value!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a plain mapping.

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e

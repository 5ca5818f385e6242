"""The lab spec: one TOML file that describes a rehearsal fleet, read into a frozen :class:`LabSpec`.

::

    [lab]
    name = "ci"                 # [a-z0-9]{1,6}: names every host resource of the lab
    subnet = "10.213.0.0/24"    # private IPv4; .1 is the coordinator, devices from .2
    seed = 0                    # the data partition's seed (and the coordinator's unless
    timeout_s = 1800            #   federation sets server.seed); bound on the whole run

    [data]
    source = "digits"           # as fedge simulate --data; a relative path is relative to this file
    partition = "dirichlet:0.5" # as --partition (not for synthetic data, which comes partitioned)
    test_fraction = 0.2         # held out for the coordinator's evaluation

    [federation]                # the coordinator's tables, as in coordinator.toml; the lab
    rounds = { count = 5, cohort_size = 4, min_updates = 3 }   # owns server.host/port/data_dir,
    secagg = { enabled = true }                                # the task's shape and TLS

    [[group]]
    name = "pi"                 # devices pi-0, pi-1, ...
    count = 2
    arch = "arm64"              # amd64 | arm64
    cpus = 1.0                  # podman --cpus
    memory = "384m"             # podman --memory, >= 96m
    disk = "64m"                # the state directory's tmpfs, >= 16m
    policy = { }                # the agent's [policy] table
    link = { rate = "1mbit", loss = 0.05, outages = [ { at_s = 40.0, for_s = 20.0 } ] }

    [[fault]]                   # zero or more; exactly one of at_round / at_s
    at_round = 3
    action = "kill-coordinator" # link-down | rate | kill-agent | kill-coordinator | fill-disk | fill-memory

:func:`load_spec` reads and checks a file; :func:`parse_spec` checks a mapping.
Every refusal is one :class:`~fedge.errors.ConfigError` line naming the file,
the key path and the value: ``lab spec ci.toml: group[1].link.rate: must be > 0, got "-1mbit"``.
Besides each value's own range, a spec is checked as a whole before anything
is started: names unique, fault targets that exist, rounds and cohorts the
fleet can hold, data that can feed every device (loaded for digits and files),
and the federation tables built into the coordinator's own config, so a bad
strategy name fails here and not in round 1.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedge.agent.policy import parse_policy
from fedge.coordinator.config import CoordinatorConfig
from fedge.data import parse_partitioner
from fedge.data.sources import DEFAULT_PARTITION
from fedge.errors import ConfigError
from fedge.lab.state import validate_lab_name
from fedge.lab.values import _human, _message, _rate_bps, _size_bytes, parse_rate, parse_size

__all__ = [
    "ACTIONS",
    "ARCHES",
    "COORDINATOR_PORT",
    "MAX_DEVICES",
    "DataSection",
    "DeviceSpec",
    "FaultSpec",
    "GroupSpec",
    "LabSection",
    "LabSpec",
    "LinkSpec",
    "Outage",
    "load_spec",
    "parse_rate",
    "parse_size",
    "parse_spec",
]

ARCHES = ("amd64", "arm64")
ACTIONS = ("link-down", "rate", "kill-agent", "kill-coordinator", "fill-disk", "fill-memory")
#: Devices one lab may hold: a namespace, a veth pair and a container each, on one machine.
MAX_DEVICES = 250
#: The coordinator's port on the lab bridge's address (only the lab's namespaces reach it).
COORDINATOR_PORT = 8443
_MIN_MEMORY = 96 * 2**20  # a Python agent with numpy loaded
_MIN_DISK = 16 * 2**20  # the agent's state, certificates and a checkpoint of a small model
_PRIVATE = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
# Federation keys the lab sets itself: where the coordinator listens and keeps its
# store, the task's shape (read from the data's test split) and mutual TLS.
_LAB_OWNED = {
    ("server", "host"): "the coordinator listens on the lab bridge's address",
    ("server", "port"): "the coordinator listens on the lab bridge's address",
    ("server", "data_dir"): "the coordinator's store lives in the run's folder",
    ("task", "eval_data"): "the coordinator evaluates on the data's held-out split",
    ("task", "num_features"): "the task's shape is read from the data",
    ("task", "num_classes"): "the task's shape is read from the data",
    ("security", "insecure"): "the lab always runs mutual TLS",
    ("security", "insecure_allow_remote"): "the lab always runs mutual TLS",
}


# ------------------------------------------------------------------ the tables


class _Table(BaseModel):
    # Strict: TOML has types, so "5" is not a number and 1.0 is not an integer.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class LabSection(_Table):
    """The ``[lab]`` table."""

    name: str
    subnet: str = "10.213.0.0/24"
    seed: Annotated[int, Field(ge=0)] = 0
    timeout_s: Annotated[float, Field(gt=0)] = 1800.0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # fl<name><iii>h must fit a 15-character interface name: the host module's own rule.
        try:
            return validate_lab_name(v)
        except ConfigError:
            raise ValueError("must be 1 to 6 lowercase letters or digits") from None

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        try:
            net = ipaddress.IPv4Network(v, strict=False)
        except ValueError:
            raise ValueError('must be an IPv4 subnet such as "10.213.0.0/24"') from None
        if net.network_address != ipaddress.IPv4Interface(v).ip:
            raise ValueError(f"has host bits set; the network is {net}")
        if not any(net.subnet_of(p) for p in _PRIVATE):
            raise ValueError("must lie in a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)")
        if net.prefixlen > 30:
            raise ValueError("leaves no address for a device (use a /30 or larger)")
        return str(net)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)


class DataSection(_Table):
    """The ``[data]`` table: ``source`` is resolved against the spec's folder."""

    source: str = "digits"
    partition: str | None = None
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2

    @field_validator("source")
    @classmethod
    def _source(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip()
        if v == "digits" or v.startswith("synthetic:"):
            return v
        if Path(v).suffix.lower() not in (".npz", ".csv"):
            raise ValueError("must be digits, synthetic:ALPHA,BETA[,DEVICES], synthetic:iid[,DEVICES], "
                             "or a .npz or .csv file")
        base = Path(info.context["base_dir"]) if info.context else Path.cwd()
        return str((base / v).resolve())

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_partitioner(v)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _synthetic(self) -> DataSection:
        if self.synthetic:
            for key in ("partition", "test_fraction"):
                if key in self.model_fields_set:
                    raise ValueError(f"{key} does not apply to synthetic data, which comes split over "
                                     "its own devices with their own test splits")
        return self

    @property
    def synthetic(self) -> bool:
        return self.source.startswith("synthetic:")

    @property
    def effective_partition(self) -> str | None:
        """The partition ``load_federated`` is given: ``None`` for synthetic data."""
        if self.synthetic:
            return None
        return DEFAULT_PARTITION if self.partition is None else self.partition


class Outage(_Table):
    """A scheduled link-down window: ``at_s`` after the first agent starts, for ``for_s``."""

    at_s: Annotated[float, Field(ge=0)]
    for_s: Annotated[float, Field(gt=0)]


class LinkSpec(_Table):
    """A group's ``link`` table: tbf rate (None: unshaped), drop probability, outages."""

    rate_bps: int | None = Field(default=None, alias="rate")
    loss: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    outages: tuple[Outage, ...] = Field((), strict=False)

    @field_validator("rate_bps", mode="before")
    @classmethod
    def _rate(cls, v: object) -> int | None:
        return None if v is None else _rate_bps(v)


class GroupSpec(_Table):
    """One ``[[group]]``: ``count`` alike devices named ``<name>-0``, ``<name>-1``, ..."""

    name: str
    count: Annotated[int, Field(ge=1)]
    arch: Literal["amd64", "arm64"] = "amd64"
    cpus: Annotated[float, Field(gt=0)] = 1.0
    memory_bytes: int = Field(default=256 * 2**20, alias="memory")
    disk_bytes: int = Field(default=64 * 2**20, alias="disk")
    policy: dict[str, JsonValue] = Field(default_factory=dict)
    link: LinkSpec = Field(default_factory=lambda: LinkSpec.model_validate({}))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", v):
            raise ValueError("must be a lowercase letter then up to 7 lowercase letters or digits")
        return v

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: float) -> float:
        host = os.cpu_count() or 1
        if v > host:
            raise ValueError(f"must be at most the host's {host} CPUs")
        return v

    @field_validator("memory_bytes", mode="before")
    @classmethod
    def _memory(cls, v: object) -> int:
        size = _size_bytes(v)
        if size < _MIN_MEMORY:
            raise ValueError(f"must be at least {_human(_MIN_MEMORY)} (a Python agent with numpy)")
        return size

    @field_validator("disk_bytes", mode="before")
    @classmethod
    def _disk(cls, v: object) -> int:
        size = _size_bytes(v)
        if size < _MIN_DISK:
            raise ValueError(f"must be at least {_human(_MIN_DISK)}")
        return size

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: dict[str, JsonValue]) -> dict[str, JsonValue]:
        try:
            parse_policy(v, source="policy")  # as the agent will read it
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("policy: ")) from None
        return v


class FaultSpec(_Table):
    """One injected fault; see the module docstring. ``origin`` says where the spec declared it."""

    action: Literal["link-down", "rate", "kill-agent", "kill-coordinator", "fill-disk", "fill-memory"]
    at_round: Annotated[int, Field(ge=1)] | None = None
    at_s: Annotated[float, Field(ge=0)] | None = None
    target: str | None = None
    for_s: Annotated[float, Field(gt=0)] | None = None
    rate_bps: int | None = Field(default=None, alias="rate")
    restart: bool = True
    restart_after_s: Annotated[float, Field(ge=0)] = 0.0
    size_bytes: int | None = Field(default=None, alias="size")
    _origin: str = PrivateAttr(default="")

    @field_validator("rate_bps", mode="before")
    @classmethod
    def _rate(cls, v: object) -> int | None:
        return None if v is None else _rate_bps(v)

    @field_validator("size_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> int | None:
        return None if v is None else _size_bytes(v)

    @model_validator(mode="after")
    def _combination(self) -> FaultSpec:
        a, given = self.action, self.model_fields_set
        if (self.at_round is None) == (self.at_s is None):
            raise ValueError("give exactly one of at_round and at_s")
        if a == "kill-coordinator" and self.target is not None:
            raise ValueError("target does not apply to kill-coordinator (there is one coordinator)")
        if a != "kill-coordinator" and self.target is None:
            raise ValueError(f"{a} needs a target (a device or group name)")
        if self.for_s is None and a in ("link-down", "fill-disk", "fill-memory"):
            raise ValueError(f"{a} needs for_s (how long, in seconds)")
        if self.for_s is not None and a.startswith("kill-"):
            raise ValueError(f"for_s does not apply to {a}; restart_after_s says when it starts again")
        if (self.rate_bps is None) == (a == "rate"):
            raise ValueError("rate applies to action rate only" if self.rate_bps is not None
                             else "action rate needs rate (the new link rate)")
        if not a.startswith("kill-") and given & {"restart", "restart_after_s"}:
            raise ValueError(f"restart and restart_after_s apply to kill-agent and kill-coordinator, not {a}")
        if not self.restart and "restart_after_s" in given:
            raise ValueError("restart_after_s does not apply with restart = false")
        if self.size_bytes is not None and not a.startswith("fill-"):
            raise ValueError(f"size applies to fill-disk and fill-memory, not {a}")
        return self

    @property
    def origin(self) -> str:
        """``fault[i]`` or ``group[i].link.outages[j]``: where the spec declared this fault."""
        return self._origin


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the lab: ``index`` counts from 0 across groups, in spec order."""

    name: str
    group: str
    index: int
    address: str
    arch: str
    cpus: float
    memory_bytes: int
    disk_bytes: int
    link: LinkSpec
    policy: Mapping[str, JsonValue]


class LabSpec(_Table):
    """A whole lab spec; build it with :func:`load_spec` or :func:`parse_spec`, which check it all."""

    lab: LabSection
    data: DataSection = Field(default_factory=DataSection)
    federation: dict[str, dict[str, JsonValue]] = Field(default_factory=dict)
    groups: tuple[GroupSpec, ...] = Field(alias="group", strict=False, min_length=1)
    scheduled: tuple[FaultSpec, ...] = Field((), alias="fault", strict=False)
    _path: Path = PrivateAttr(default=Path("lab.toml"))
    _coordinator: CoordinatorConfig | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _whole(self) -> LabSpec:
        for i, f in enumerate(self.scheduled):
            f._origin = f"fault[{i}]"
        _check_owned(self.federation)
        seen: dict[str, int] = {}
        for i, g in enumerate(self.groups):
            if g.name in seen:
                raise ValueError(f"group[{i}].name: {g.name!r} is already the name of group[{seen[g.name]}]")
            seen[g.name] = i
        n, net = sum(g.count for g in self.groups), self.lab.network
        room = min(MAX_DEVICES, net.num_addresses - 3)  # less the network, broadcast and .1 addresses
        if n > room:
            why = (f"the {MAX_DEVICES} one lab may hold" if room == MAX_DEVICES
                   else f"the {room} device addresses of lab.subnet {net} (after the coordinator's .1)")
            raise ValueError(f"group: {n} devices in all, more than {why}")
        for f in self.faults:
            self._check_fault(f)
        return self

    def _check_fault(self, f: FaultSpec) -> None:
        at = f.origin
        if f.at_s is not None and f.at_s >= self.lab.timeout_s:
            raise ValueError(f"{at}.at_s: {f.at_s:g} is past lab.timeout_s ({self.lab.timeout_s:g})")
        rounds = self.federation.get("rounds", {}).get("count", CoordinatorConfig.rounds)
        if f.at_round is not None and isinstance(rounds, int) and 1 <= rounds < f.at_round:
            raise ValueError(f"{at}.at_round: {f.at_round} is beyond the {rounds} rounds "
                             "(federation rounds.count)")
        if f.target is None:
            return
        targets = self.targets(f.target)
        if not targets:
            groups = ", ".join(f"{g.name} ({g.name}-0{f'..{g.name}-{g.count - 1}' if g.count > 1 else ''})"
                               for g in self.groups)
            raise ValueError(f"{at}.target: {f.target!r} names no device or group; groups: {groups}")
        if f.size_bytes is not None and f.action in ("fill-disk", "fill-memory"):
            what = "disk" if f.action == "fill-disk" else "memory"
            for d in targets:
                limit = d.disk_bytes if what == "disk" else d.memory_bytes
                if f.size_bytes > limit:
                    raise ValueError(f"{at}.size: {_human(f.size_bytes)} is more than device {d.name}'s "
                                     f"{what} ({_human(limit)})")

    @property
    def path(self) -> Path:
        """The spec file (for :func:`parse_spec`: ``base_dir / name``)."""
        return self._path

    @property
    def rounds(self) -> int:
        """The rounds the federation runs (``federation.rounds.count``)."""
        return self.federation_config.rounds

    @property
    def arches(self) -> frozenset[str]:
        return frozenset(g.arch for g in self.groups)

    @property
    def coordinator_address(self) -> str:
        """The bridge's address, ``.1`` of the subnet, where the coordinator listens."""
        return str(self.lab.network.network_address + 1)

    def devices(self) -> list[DeviceSpec]:
        """Every device, group by group in spec order; addresses from ``.2``."""
        out: list[DeviceSpec] = []
        base = self.lab.network.network_address + 2
        for g in self.groups:
            for k in range(g.count):
                i = len(out)
                out.append(DeviceSpec(name=f"{g.name}-{k}", group=g.name, index=i, address=str(base + i),
                                      arch=g.arch, cpus=g.cpus, memory_bytes=g.memory_bytes,
                                      disk_bytes=g.disk_bytes, link=g.link, policy=g.policy))
        return out

    def targets(self, name: str) -> list[DeviceSpec]:
        """The devices a fault target names: one device, or every device of a group."""
        return [d for d in self.devices() if name in (d.name, d.group)]

    @property
    def faults(self) -> list[FaultSpec]:
        """The ``[[fault]]`` tables and every group's outages (as link-down faults on the group).

        Sorted by trigger, round faults (by round) before timed ones (by time); ties keep spec order.
        """
        out = list(self.scheduled)
        for i, g in enumerate(self.groups):
            for j, o in enumerate(g.link.outages):
                f = FaultSpec(action="link-down", at_s=o.at_s, target=g.name, for_s=o.for_s)
                f._origin = f"group[{i}].link.outages[{j}]"
                out.append(f)
        return sorted(out, key=lambda f: (0, f.at_round) if f.at_round is not None else (1, f.at_s))

    @property
    def federation_config(self) -> CoordinatorConfig:
        """The coordinator's config as the lab will run it, checked against the data and the fleet.

        ``host`` and ``port`` are the lab's; ``data_dir`` is a placeholder and the
        task's shape is given directly instead of ``eval_data`` (the run writes both).
        """
        if self._coordinator is None:
            from fedge.lab.data import check_federation  # loads the data: only when asked

            self._coordinator = check_federation(self)
        return self._coordinator


def _check_owned(federation: Mapping[str, Mapping[str, JsonValue]]) -> None:
    for (table, key), why in _LAB_OWNED.items():
        if key in federation.get(table, {}):
            raise ValueError(f"federation.{table}.{key}: the lab sets it ({why}); remove it")


# ------------------------------------------------------------------ entry points


def load_spec(path: Path) -> LabSpec:
    """Read and check the lab spec at ``path`` (relative data paths: against its folder).

    Raises:
        ConfigError: the file is missing or not TOML, or the spec is refused (one line:
            the file, the key path and the value).
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"lab spec {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"lab spec {path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"lab spec {path}: not valid TOML ({e})") from None
    spec = parse_spec(data, base_dir=Path(path).resolve().parent, name=str(path))
    spec._path = Path(path).resolve()
    return spec


def parse_spec(data: Mapping[str, object], *, base_dir: Path, name: str) -> LabSpec:
    """Check a lab spec given as a mapping (a parsed TOML file); ``name`` labels the errors.

    Raises:
        ConfigError: ``lab spec NAME: KEY.PATH: what is wrong, got VALUE``.
    """
    label = f"lab spec {name}"
    try:
        spec = LabSpec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(f"{label}: {_message(e.errors(include_url=False)[0], LabSpec)}") from None
    spec._path = Path(base_dir) / Path(name).name
    try:
        spec.federation_config  # noqa: B018 - loads the data and builds the coordinator's config
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    return spec

"""What a lab derives from its spec: the devices' data files, the coordinator's config, a twin simulation.

* :func:`write_device_data` writes each device's share of the data (one ``.npz``
  per device, arrays ``x`` and ``y``, the layout the agent reads) and the held-out
  test split the coordinator evaluates on. The split is
  :func:`fedge.data.load_federated`'s with the spec's source, partition, seed and
  device count, devices in spec order: exactly what ``fedge simulate`` builds
  from the arguments :func:`simulate_args` returns, so a lab's accuracy can be
  set beside a plain simulation of the same partitions.
* :func:`coordinator_toml` is the coordinator's ``coordinator.toml`` for a run:
  the spec's federation tables plus what the lab owns (address, port, store, test split).
* :func:`check_data` and :func:`check_federation` are the spec's checks that read
  data: :attr:`fedge.lab.spec.LabSpec.federation_config` runs them when a spec is parsed.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from fedge.coordinator.config import CoordinatorConfig, load_coordinator_config
from fedge.data import DataSpec, FederatedData, load_federated
from fedge.data.sources import SYNTHETIC_NUM_DEVICES
from fedge.errors import ConfigError
from fedge.lab.spec import COORDINATOR_PORT, DeviceSpec, LabSpec
from fedge.store import atomic_write

__all__ = ["DeviceData", "agent_toml", "check_data", "check_federation", "coordinator_toml", "simulate_args",
           "write_device_data"]

# fedge simulate holds out this share of the data for testing, and has no flag to change it.
_SIMULATE_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DeviceData:
    """The files :func:`write_device_data` wrote: device name -> ``.npz``, and the test split."""

    devices: Mapping[str, Path]
    test: Path
    num_examples: Mapping[str, int]
    num_features: int
    num_classes: int


def _federated(spec: LabSpec) -> FederatedData:
    n = len(spec.devices())
    try:
        return load_federated(spec.data.source, partition=spec.data.effective_partition,
                              num_devices=None if spec.data.synthetic else n, seed=spec.lab.seed,
                              test_fraction=spec.data.test_fraction)
    except ConfigError as e:
        raise ConfigError(f"data.source: {e}") from None


def check_data(spec: LabSpec) -> DataSpec:
    """Load the data as a run will, check it feeds every device, and return its shape.

    Raises:
        ConfigError: the source cannot be read, synthetic data names another device
            count than the lab's, or a device would get no training example.
    """
    n = len(spec.devices())
    source = spec.data.source
    if spec.data.synthetic:  # its device count is in its name: no need to draw it to compare
        fields = source.partition(":")[2].split(",")
        tail = fields[1:] if fields[0].strip().lower() == "iid" else fields[2:]
        count = tail[0].strip() if tail else str(SYNTHETIC_NUM_DEVICES)
        if count.isdigit() and int(count) != n:
            raise ConfigError(f"data.source: {source!r} comes split over its own {count} devices but the "
                              f"lab has {n}; give the lab's count in the name (synthetic:...,{n})")
    fed = _federated(spec)
    for d, share in zip(spec.devices(), fed.devices, strict=True):
        if len(share) < 1:  # the partitioners prevent it; a file of few examples must not slip past
            raise ConfigError(f"data: device {d.name} gets no training example ({fed.num_examples} "
                              f"training examples over {n} devices)")
    return fed.spec


def check_federation(spec: LabSpec) -> CoordinatorConfig:
    """The coordinator's config built from the federation tables as ``fedge coordinator`` would.

    Also builds the task for the data's shape, and refuses a cohort or a
    ``min_devices`` larger than the fleet.

    Raises:
        ConfigError: ``federation...: what is wrong``, or a data refusal (:func:`check_data`).
    """
    from fedge.tasks import load_task

    shape = check_data(spec)
    with tempfile.TemporaryDirectory(prefix="fedge-lab-spec-") as tmp:
        path = Path(tmp) / "coordinator.toml"
        path.write_text(_toml(_tables(spec, port=COORDINATOR_PORT, data_dir=Path(tmp) / "store", task={
            "num_features": shape.num_features, "num_classes": shape.num_classes})))
        try:
            config = load_coordinator_config(path)
        except ConfigError as e:
            text = str(e).replace(f"config file {str(path)!r}", "federation").replace(str(path), "federation")
            raise ConfigError(text if text.startswith("federation") else f"federation: {text}") from None
    try:
        load_task(config.task, shape)
    except ConfigError as e:
        raise ConfigError(f"federation.task.name: {e}") from None
    n = len(spec.devices())
    rounds = spec.federation.get("rounds", {})
    if config.cohort_size > n:
        default = "" if "cohort_size" in rounds else " (the default)"
        raise ConfigError(f"federation.rounds.cohort_size: {config.cohort_size}{default} is more than the "
                          f"lab's {n} devices")
    if config.effective_min_devices > n:
        default = "" if "min_devices" in rounds else " (the default: rounds.min_updates)"
        raise ConfigError(f"federation.rounds.min_devices: {config.effective_min_devices}{default} is more "
                          f"than the lab's {n} devices")
    return config


# ------------------------------------------------------------------ files


def write_device_data(spec: LabSpec, out_dir: Path) -> DeviceData:
    """Write ``<device>.npz`` for every device and ``test.npz`` into ``out_dir`` (made if missing).

    Each file is written atomically; the same spec writes the same bytes' worth of
    examples (a re-run replaces the files).

    Raises:
        ConfigError: the data cannot be loaded or split (as :func:`check_data`).
    """
    fed = _federated(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    devices, counts = {}, {}
    for d, share in zip(spec.devices(), fed.devices, strict=True):
        devices[d.name] = _save(out_dir / f"{d.name}.npz", share.x, share.y)
        counts[d.name] = len(share)
    test = _save(out_dir / "test.npz", fed.test.x, fed.test.y)
    return DeviceData(devices=devices, test=test, num_examples=counts,
                      num_features=fed.spec.num_features, num_classes=fed.spec.num_classes)


def _save(path: Path, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    atomic_write(path, buffer.getvalue())
    return path


def _tables(spec: LabSpec, *, port: int, data_dir: Path,
            task: Mapping[str, JsonValue]) -> dict[str, dict[str, JsonValue]]:
    tables = {name: dict(table) for name, table in spec.federation.items()}
    tables.setdefault("task", {}).update(task)
    server = tables.setdefault("server", {})
    server.update(host=spec.coordinator_address, port=port, data_dir=str(data_dir))
    server.setdefault("seed", spec.lab.seed)
    return tables


def coordinator_toml(spec: LabSpec, *, data_dir: Path, eval_data: Path, port: int = COORDINATOR_PORT) -> str:
    """The ``coordinator.toml`` of a lab run: the federation tables plus what the lab owns.

    ``[server]`` gets the bridge's address, ``port`` and ``data_dir``, and ``seed``
    (the lab's unless the federation sets one); ``[task]`` gets ``eval_data``.
    """
    return _toml(_tables(spec, port=port, data_dir=data_dir, task={"eval_data": str(eval_data)}))


def agent_toml(device: DeviceSpec) -> str:
    """The device's ``agent.toml``: its group's ``[policy]`` table (empty: the agent's defaults)."""
    return _toml({"policy": dict(device.policy)}) if device.policy else ""


def _toml(tables: Mapping[str, Mapping[str, JsonValue]]) -> str:
    lines: list[str] = []
    for name, table in tables.items():
        lines += [f"[{_key(name)}]", *(f"{_key(k)} = {_value(v)}" for k, v in table.items()), ""]
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(v: JsonValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)  # finite: the spec refuses inf and nan
    if isinstance(v, str):
        return json.dumps(v)  # JSON's string escapes are valid in a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"federation: {v!r} has no TOML form")


# ------------------------------------------------------------------ the twin simulation


def simulate_args(spec: LabSpec) -> list[str]:
    """The arguments of ``fedge simulate`` (after the subcommand) for the lab's federation.

    The same data, partition, device count and seed (so the same partitions),
    rounds, cohort size, task, strategy and its options, local training, update
    encoding, differential privacy and secure aggregation. What the simulator
    has no flag for (over-selection, ``min_updates``, deadlines, secure
    aggregation's phase timing) is left out: it changes which devices a round
    waits for, not what a round computes. Run flags (``--out``, ``--quiet``, ...)
    are the caller's.

    Raises:
        ConfigError: ``data.test_fraction`` is not 0.2, the share ``fedge simulate`` holds out.
    """
    if spec.data.test_fraction != _SIMULATE_TEST_FRACTION and not spec.data.synthetic:
        raise ConfigError(f"data.test_fraction: fedge simulate holds out {_SIMULATE_TEST_FRACTION} of the "
                          f"data and has no flag to change it, got {spec.data.test_fraction}")
    c = spec.federation_config
    args = ["--data", spec.data.source, "--seed", str(spec.lab.seed), "--rounds", str(c.rounds),
            "--cohort", str(c.cohort_size), "--task", c.task, "--strategy", c.strategy,
            "--local-epochs", str(c.local_epochs), "--batch-size", str(c.batch_size), "--lr", repr(c.lr),
            "--eval-every", str(c.eval_every), "--compress", c.compress]
    if not spec.data.synthetic:
        args += ["--partition", str(spec.data.effective_partition), "--devices", str(len(spec.devices()))]
    for key, option in c.strategy_options.items():
        args += ["--strategy-option", f"{key}={option!r}"]
    optional: dict[str, float | int | str | None] = {
        "--mu": c.mu, "--compress-bucket": c.compress_bucket, "--compress-range": c.compress_range,
        "--dp": c.dp, "--clip-norm": c.clip_norm, "--noise-multiplier": c.noise_multiplier,
        "--target-epsilon": c.target_epsilon, "--delta": c.delta, "--epsilon-budget": c.epsilon_budget,
        "--accountant": c.accountant}
    if c.secagg:
        args.append("--secagg")
        optional.update({"--secagg-k": c.secagg_k, "--secagg-threshold": c.secagg_threshold,
                         "--secagg-bits": c.secagg_bits, "--secagg-clip": c.secagg_clip_value})
    for flag, given in optional.items():
        if given is not None:
            args += [flag, repr(given) if isinstance(given, float) else str(given)]
    return args

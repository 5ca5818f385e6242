"""Tests for fedge.data.sources: bundled digits, FedProx synthetic, load_federated."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest

import fedge
from fedge.data import Dataset, sources
from fedge.data.sources import load_digits_dataset, load_federated, synthetic_fedprox
from fedge.errors import ConfigError, DataError, UnknownNameError

SRC = str(Path(fedge.__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def test_digits_shape_range_and_classes() -> None:
    ds = load_digits_dataset()
    assert ds.x.shape == (1797, 64)
    assert ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64
    assert float(ds.x.min()) == 0.0
    assert float(ds.x.max()) == 1.0
    assert np.unique(ds.y).tolist() == list(range(10))
    # Pixel intensities are whole numbers 0..16 before scaling.
    assert np.array_equal(ds.x * 16, np.round(ds.x * 16))


def test_digits_do_not_import_sklearn() -> None:
    code = (
        "import sys\n"
        "from fedge.data import load_digits_dataset\n"
        "ds = load_digits_dataset()\n"
        "assert len(ds) == 1797\n"
        "assert 'sklearn' not in sys.modules, 'sklearn was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_digits_without_sklearn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install 'fedge\[sim\]'"):
        load_digits_dataset()


def test_digits_with_data_file_missing_names_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = ModuleSpec("sklearn", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(sources, "find_spec", lambda name: spec)
    with pytest.raises(DataError, match=r"digits data is missing at .*digits\.csv\.gz"):
        load_digits_dataset()


# ---------------------------------------------------------------------------
# FedProx synthetic
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("iid", [False, True])
def test_synthetic_shapes_sizes_and_split(iid: bool) -> None:
    pairs = synthetic_fedprox(1.0, 1.0, iid=iid, rng=np.random.default_rng(0))
    assert len(pairs) == 30
    for train, test in pairs:
        n = len(train) + len(test)
        assert n >= 50
        assert len(train) == int(0.9 * n)
        for part in (train, test):
            assert part.x.shape[1] == 60
            assert part.x.dtype == np.float32
            assert part.y.dtype == np.int64
            assert part.y.min() >= 0
            assert part.y.max() <= 9
    all_y = np.concatenate([t.y for pair in pairs for t in pair])
    assert np.unique(all_y).shape[0] >= 5


def test_synthetic_is_deterministic_for_a_seed() -> None:
    a = synthetic_fedprox(0.5, 0.5, iid=False, rng=np.random.default_rng(7))
    b = synthetic_fedprox(0.5, 0.5, iid=False, rng=np.random.default_rng(7))
    c = synthetic_fedprox(0.5, 0.5, iid=False, rng=np.random.default_rng(8))
    for p, q in zip(a, b, strict=True):
        assert np.array_equal(p[0].x, q[0].x)
        assert np.array_equal(p[1].y, q[1].y)
    assert [len(p[0]) for p in a] != [len(p[0]) for p in c]


def test_synthetic_num_devices() -> None:
    pairs = synthetic_fedprox(0.0, 0.0, iid=False, rng=np.random.default_rng(0), num_devices=3)
    assert len(pairs) == 3


def test_synthetic_iid_inputs_are_centred_and_share_one_model() -> None:
    pairs = synthetic_fedprox(0.0, 0.0, iid=True, rng=np.random.default_rng(1))
    x = np.concatenate([tr.x for tr, _ in pairs])
    # Feature j has variance (j + 1) ** -1.2 around mean 0.
    assert np.all(np.abs(x.mean(axis=0)) < 0.1)
    assert abs(float(x[:, 0].var()) - 1.0) < 0.1
    assert abs(float(x[:, 59].var()) - 60**-1.2) < 0.01


def test_synthetic_beta_spreads_device_input_means() -> None:
    pairs = synthetic_fedprox(0.0, 5.0, iid=False, rng=np.random.default_rng(2))
    device_means = np.array([tr.x.mean() for tr, _ in pairs])
    assert float(device_means.std()) > 1.5
    same = synthetic_fedprox(0.0, 0.0, iid=False, rng=np.random.default_rng(2))
    assert float(np.array([tr.x.mean() for tr, _ in same]).std()) < 0.5


@pytest.mark.parametrize(
    ("alpha", "beta", "fragment"),
    [
        (-1.0, 0.0, "alpha must be a finite number >= 0, got -1.0"),
        (0.0, -0.5, "beta must be a finite number >= 0, got -0.5"),
        (float("nan"), 0.0, "alpha must be a finite number >= 0, got nan"),
        (0.0, float("inf"), "beta must be a finite number >= 0, got inf"),
        ("1", 0.0, "alpha must be a number >= 0, got '1'"),
    ],
)
def test_synthetic_refuses_bad_alpha_beta(alpha: float, beta: float, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        synthetic_fedprox(alpha, beta, iid=False, rng=np.random.default_rng(0))
    assert fragment in str(e.value)


def test_synthetic_refuses_zero_devices() -> None:
    with pytest.raises(ConfigError, match="num_devices must be an integer >= 1, got 0"):
        synthetic_fedprox(0.0, 0.0, iid=False, rng=np.random.default_rng(0), num_devices=0)


# ---------------------------------------------------------------------------
# load_federated: digits and files
# ---------------------------------------------------------------------------


def test_federated_digits_defaults() -> None:
    fd = load_federated("digits", partition=None, num_devices=None, seed=0)
    assert fd.name == "digits"
    assert len(fd.devices) == 20
    assert len(fd.test) == 359  # round(0.2 * 1797)
    assert fd.num_examples == 1797 - 359
    assert all(len(d) >= 1 for d in fd.devices)
    assert (fd.spec.num_features, fd.spec.num_classes) == (64, 10)


def test_federated_digits_test_set_is_stratified() -> None:
    full = np.bincount(load_digits_dataset().y)
    fd = load_federated("digits", partition="iid", num_devices=5, seed=3)
    held = np.bincount(fd.test.y, minlength=10)
    assert np.all(np.abs(held - 0.2 * full) <= 1)
    pooled = np.concatenate([d.y for d in fd.devices])
    assert np.array_equal(np.bincount(pooled, minlength=10) + held, full)


def test_federated_iid_partition_of_digits() -> None:
    fd = load_federated("digits", partition="iid", num_devices=7, seed=0)
    sizes = [len(d) for d in fd.devices]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1438


def test_federated_seed_determines_everything() -> None:
    a = load_federated("digits", partition="dirichlet:0.3", num_devices=10, seed=5)
    b = load_federated("digits", partition="dirichlet:0.3", num_devices=10, seed=5)
    c = load_federated("digits", partition="dirichlet:0.3", num_devices=10, seed=6)
    assert all(np.array_equal(d.x, e.x) for d, e in zip(a.devices, b.devices, strict=True))
    assert [len(d) for d in a.devices] != [len(d) for d in c.devices]


def test_federated_test_split_does_not_depend_on_the_partition() -> None:
    a = load_federated("digits", partition="iid", num_devices=4, seed=9)
    b = load_federated("digits", partition="shards:2", num_devices=12, seed=9)
    assert np.array_equal(a.test.x, b.test.x)
    assert np.array_equal(a.test.y, b.test.y)


def test_federated_csv_file(tmp_path: Path) -> None:
    rows = [f"{i},{i % 3}" for i in range(10)]
    path = tmp_path / "d.csv"
    path.write_text("value,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    fd = load_federated(str(path), partition="iid", num_devices=4, seed=0)
    assert len(fd.test) == 2
    assert fd.num_examples == 8
    assert len(fd.devices) == 4
    assert (fd.spec.num_features, fd.spec.num_classes) == (1, 3)
    values = sorted(np.concatenate([fd.test.x[:, 0], *[d.x[:, 0] for d in fd.devices]]).tolist())
    assert values == [float(i) for i in range(10)]


def test_federated_npz_file_num_classes_is_max_label_plus_one(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 5])  # label 5 appears once
    np.savez(path, x=np.arange(10.0).reshape(10, 1), y=y)
    fd = load_federated(str(path), partition="iid", num_devices=2, seed=0)
    assert fd.spec.num_classes == 6


def test_federated_default_partition_is_dirichlet(tmp_path: Path) -> None:
    a = load_federated("digits", partition=None, num_devices=None, seed=1)
    b = load_federated("digits", partition="dirichlet:0.5", num_devices=20, seed=1)
    assert [len(d) for d in a.devices] == [len(d) for d in b.devices]


# ---------------------------------------------------------------------------
# load_federated: synthetic
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "alpha", "beta", "iid"),
    [
        ("synthetic:0.5,0.5", 0.5, 0.5, False),
        ("synthetic:1,0", 1.0, 0.0, False),
        ("synthetic:iid", 0.0, 0.0, True),
    ],
)
def test_federated_synthetic(
    monkeypatch: pytest.MonkeyPatch, name: str, alpha: float, beta: float, iid: bool
) -> None:
    calls: list[tuple[float, float, bool, list[tuple[Dataset, Dataset]]]] = []

    def spy(
        a: float, b: float, *, iid: bool, rng: np.random.Generator, num_devices: int = 30
    ) -> list[tuple[Dataset, Dataset]]:
        pairs = synthetic_fedprox(a, b, iid=iid, rng=rng, num_devices=num_devices)
        calls.append((a, b, iid, pairs))
        return pairs

    monkeypatch.setattr(sources, "synthetic_fedprox", spy)
    fd = load_federated(name, partition=None, num_devices=None, seed=0)
    [(a, b, got_iid, pairs)] = calls
    assert (a, b, got_iid) == (alpha, beta, iid)
    assert len(fd.devices) == 30
    assert fd.spec.num_features == 60
    assert fd.spec.num_classes == int(max(max(tr.y.max(), te.y.max()) for tr, te in pairs)) + 1
    assert all(d is tr for d, (tr, _) in zip(fd.devices, pairs, strict=True))
    assert np.array_equal(fd.test.x, np.concatenate([te.x for _, te in pairs]))
    assert np.array_equal(fd.test.y, np.concatenate([te.y for _, te in pairs]))


def test_federated_synthetic_accepts_explicit_thirty_devices() -> None:
    fd = load_federated("synthetic:1,1", partition=None, num_devices=30, seed=0)
    assert len(fd.devices) == 30


@pytest.mark.parametrize("name", ["synthetic:0.5,0.5,7", "synthetic:iid,7", "synthetic:0.5, 0.5, 7"])
def test_federated_synthetic_device_count(name: str) -> None:
    fd = load_federated(name, partition=None, num_devices=None, seed=0)
    assert len(fd.devices) == 7
    assert len(load_federated(name, partition=None, num_devices=7, seed=0).devices) == 7


def test_federated_synthetic_thirty_is_the_default_count() -> None:
    a = load_federated("synthetic:1,1", partition=None, num_devices=None, seed=3)
    b = load_federated("synthetic:1,1,30", partition=None, num_devices=None, seed=3)
    assert len(a.devices) == len(b.devices) == 30
    assert all(np.array_equal(x.x, y.x) and np.array_equal(x.y, y.y)
               for x, y in zip(a.devices, b.devices, strict=True))


def test_federated_synthetic_refuses_devices_other_than_its_count() -> None:
    with pytest.raises(ConfigError, match=r"comes partitioned into its 12 devices.*--devices 10"):
        load_federated("synthetic:1,1,12", partition=None, num_devices=10, seed=0)


@pytest.mark.parametrize(
    ("partition", "num_devices", "given"),
    [("iid", None, "--partition iid"), (None, 10, "--devices 10"), ("iid", 30, "--partition iid")],
)
def test_federated_synthetic_refuses_partition_and_devices(
    partition: str | None, num_devices: int | None, given: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_federated("synthetic:1,1", partition=partition, num_devices=num_devices, seed=0)
    message = str(e.value)
    assert "comes partitioned into its 30 devices" in message
    assert "--partition/--devices do not apply" in message
    assert given in message


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("synthetic:a,1", "alpha must be a number >= 0, got 'a'"),
        ("synthetic:1,b", "beta must be a number >= 0, got 'b'"),
        ("synthetic:-1,0", "alpha must be a finite number >= 0, got -1.0"),
        ("synthetic:0,-2", "beta must be a finite number >= 0, got -2.0"),
        ("synthetic:nan,0", "alpha must be a finite number >= 0, got nan"),
        ("synthetic:1", "expected synthetic:ALPHA,BETA"),
        ("synthetic:1,2,3,4", "expected synthetic:ALPHA,BETA"),
        ("synthetic:iid,3,4", "expected synthetic:ALPHA,BETA"),
        ("synthetic:1,1,0", "DEVICES must be an integer between 1 and 1,000,000, got '0'"),
        ("synthetic:1,1,-5", "DEVICES must be an integer between 1 and 1,000,000, got '-5'"),
        ("synthetic:1,1,2.5", "DEVICES must be an integer between 1 and 1,000,000, got '2.5'"),
        ("synthetic:1,1,ten", "DEVICES must be an integer between 1 and 1,000,000, got 'ten'"),
        ("synthetic:1,1,", "DEVICES must be an integer between 1 and 1,000,000, got ''"),
        ("synthetic:1,1,1000001", "got '1000001'"),
        ("synthetic:iid,0", "DEVICES must be an integer between 1 and 1,000,000, got '0'"),
        ("synthetic:", "expected synthetic:ALPHA,BETA"),
        ("synthetic", "expected synthetic:ALPHA,BETA"),
    ],
)
def test_federated_synthetic_refuses_bad_specs(name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_federated(name, partition=None, num_devices=None, seed=0)
    assert str(e.value).startswith(f"data {name!r}: ")
    assert fragment in str(e.value)


# ---------------------------------------------------------------------------
# load_federated: refused inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "Digits", "data.txt", ""])
def test_federated_unknown_data_is_refused(name: str) -> None:
    with pytest.raises(UnknownNameError) as e:
        load_federated(name, partition=None, num_devices=None, seed=0)
    assert e.value.kind == "data"
    assert "synthetic:ALPHA,BETA" in str(e.value)
    assert "PATH.csv" in str(e.value)


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_federated_missing_file_names_the_path(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"absent{suffix}"
    with pytest.raises(DataError, match=f"{path}: no such file"):
        load_federated(str(path), partition=None, num_devices=None, seed=0)


def test_federated_more_devices_than_training_examples_names_both() -> None:
    with pytest.raises(ConfigError, match="1439 devices but only 1438 training examples"):
        load_federated("digits", partition="iid", num_devices=1439, seed=0)


def test_federated_as_many_devices_as_training_examples() -> None:
    fd = load_federated("digits", partition="iid", num_devices=1438, seed=0)
    assert all(len(d) == 1 for d in fd.devices)


def test_federated_file_too_small_to_split_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_text("1,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="needs at least 2 examples"):
        load_federated(str(path), partition="iid", num_devices=1, seed=0)


def test_federated_single_class_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mono.csv"
    path.write_text("1,0\n2,0\n3,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="at least two classes"):
        load_federated(str(path), partition="iid", num_devices=1, seed=0)


@pytest.mark.parametrize("num_devices", [0, -3])
def test_federated_num_devices_below_one_is_refused(num_devices: int) -> None:
    with pytest.raises(ConfigError, match=f"must be an integer >= 1, got {num_devices}"):
        load_federated("digits", partition=None, num_devices=num_devices, seed=0)


def test_federated_negative_seed_is_refused() -> None:
    with pytest.raises(ConfigError, match="seed must be an integer >= 0, got -1"):
        load_federated("digits", partition=None, num_devices=None, seed=-1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_federated_test_fraction_out_of_range_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction must be a number in"):
        load_federated("digits", partition=None, num_devices=None, seed=0, test_fraction=fraction)


def test_federated_bad_partition_is_refused() -> None:
    with pytest.raises(UnknownNameError):
        load_federated("digits", partition="random", num_devices=None, seed=0)
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        load_federated("digits", partition="dirichlet:0", num_devices=None, seed=0)
    with pytest.raises(ConfigError, match="classes_per_device must be <= the number of classes"):
        load_federated("digits", partition="shards:11", num_devices=None, seed=0)


@pytest.mark.parametrize("name", ["synthetic:0.5,0.5,9", "synthetic:iid,9"])
def test_synthetic_shard_equals_the_full_draws_devices(name: str) -> None:
    full = load_federated(name, partition=None, num_devices=None, seed=5)
    shard = sources.synthetic_shard(name, seed=5, keep=lambda k: k % 3 == 1)
    assert sorted(shard) == [1, 4, 7]
    for k, d in shard.items():
        assert np.array_equal(d.x, full.devices[k].x) and np.array_equal(d.y, full.devices[k].y)


def test_synthetic_shard_refuses_bad_names() -> None:
    with pytest.raises(ConfigError, match="DEVICES must be"):
        sources.synthetic_shard("synthetic:1,1,0", seed=0, keep=lambda k: True)

"""Simulated attacks: spec parsing and its refusals, the draw of malicious devices, and
what a malicious device sends instead of its update."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from fedge.data.dataset import Dataset, DataSpec, FederatedData
from fedge.errors import ConfigError
from fedge.sim.attacks import Attack, AttackSpec, choose_malicious, flip_labels, parse_attack


def delta() -> dict[str, np.ndarray]:
    return {"w": np.array([[1.0, -2.0]], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}


@pytest.mark.parametrize(
    ("spec", "kind", "value"),
    [("sign-flip:10", "sign-flip", 10.0), ("scale:2.5", "scale", 2.5),
     ("gaussian:0.1", "gaussian", 0.1), ("label-flip", "label-flip", None)],
)
def test_parse(spec: str, kind: str, value: float | None) -> None:
    parsed = parse_attack(spec)
    assert parsed == AttackSpec(kind, value)
    assert parsed.text == spec
    assert parsed.changes_data == (kind == "label-flip")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("flip", "unknown attack 'flip'; known: sign-flip:SCALE, scale:FACTOR"),
        ("", "unknown attack ''"),
        ("sign-flip", "needs its SCALE: sign-flip:SCALE"),
        ("scale:", "needs its FACTOR"),
        ("gaussian:loud", "SIGMA must be a number, got 'loud'"),
        ("sign-flip:0", "SCALE must be a positive finite number"),
        ("scale:-2", "FACTOR must be a positive finite number"),
        ("gaussian:inf", "SIGMA must be a positive finite number"),
        ("gaussian:nan", "SIGMA must be a positive finite number"),
        ("label-flip:3", "label-flip takes no ':ARG'"),
    ],
)
def test_bad_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_attack(spec)


def test_malicious_devices_are_drawn_from_the_seed() -> None:
    a = choose_malicious(20, 0.2, seed=0)
    assert len(a) == 4 and all(0 <= d < 20 for d in a)
    assert choose_malicious(20, 0.2, seed=0) == a
    assert any(choose_malicious(20, 0.2, seed=s) != a for s in range(1, 5))
    assert len(choose_malicious(10, 0.25, seed=3)) == 3  # 2.5 rounds half up
    assert len(choose_malicious(1000, 0.1, seed=1)) == 100


@pytest.mark.parametrize(
    ("devices", "fraction", "message"),
    [
        (20, 0.0, r"fraction in \(0, 1\)"),
        (20, 1.0, r"fraction in \(0, 1\)"),
        (20, -0.1, r"fraction in \(0, 1\)"),
        (20, math.nan, r"fraction in \(0, 1\)"),
        (20, 0.01, "makes no device malicious; use at least 0.05"),
        (20, 0.99, "leaves no honest device"),
    ],
)
def test_bad_fractions_are_refused(devices: int, fraction: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        choose_malicious(devices, fraction, seed=0)


def test_honest_devices_send_their_update() -> None:
    attack = Attack(parse_attack("sign-flip:10"), frozenset({3}))
    d = delta()
    out = attack.apply(0, d, np.random.default_rng(0))
    for k in d:
        np.testing.assert_array_equal(out[k], d[k])


def test_sign_flip_and_scale() -> None:
    rng = np.random.default_rng(0)
    flipped = Attack(parse_attack("sign-flip:10"), frozenset({3})).apply(3, delta(), rng)
    np.testing.assert_array_equal(flipped["w"], [[-10.0, 20.0]])
    np.testing.assert_array_equal(flipped["b"], [-5.0])
    assert flipped["w"].dtype == np.float32
    scaled = Attack(parse_attack("scale:3"), frozenset({3})).apply(3, delta(), rng)
    np.testing.assert_array_equal(scaled["w"], [[3.0, -6.0]])


def test_gaussian_replaces_the_update_with_noise_from_the_devices_generator() -> None:
    attack = Attack(parse_attack("gaussian:2"), frozenset({1}))
    big = {"w": np.zeros(50_000, dtype=np.float32)}
    a = attack.apply(1, big, np.random.default_rng(5))["w"]
    b = attack.apply(1, big, np.random.default_rng(5))["w"]
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32
    assert np.std(a) == pytest.approx(2.0, rel=0.02)
    assert abs(np.mean(a)) < 0.05


def test_label_flip_leaves_updates_alone_and_flips_the_malicious_devices_labels() -> None:
    attack = Attack(parse_attack("label-flip"), frozenset({1}))
    d = delta()
    np.testing.assert_array_equal(attack.apply(1, d, np.random.default_rng(0))["w"], d["w"])
    x = np.zeros((4, 2), dtype=np.float32)
    y = np.array([0, 1, 2, 3], dtype=np.int64)
    data = FederatedData("t", (Dataset(x, y), Dataset(x, y)), Dataset(x, y), DataSpec(2, 5))
    flipped = flip_labels(data, attack.malicious)
    np.testing.assert_array_equal(flipped.devices[0].y, [0, 1, 2, 3])
    np.testing.assert_array_equal(flipped.devices[1].y, [4, 3, 2, 1])  # c -> C - 1 - c, C = 5
    np.testing.assert_array_equal(flipped.test.y, [0, 1, 2, 3])
    np.testing.assert_array_equal(data.devices[1].y, [0, 1, 2, 3])  # the input is not changed


def test_an_attack_pickles_for_worker_processes() -> None:
    attack = Attack(parse_attack("gaussian:0.5"), frozenset({1, 4}))
    assert pickle.loads(pickle.dumps(attack)) == attack

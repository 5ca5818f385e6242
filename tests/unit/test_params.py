"""Tests for fedge.params: pure arithmetic over name -> ndarray mappings."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from params_asserts import assert_params_equal, deep_copy

from fedge import params as P
from fedge.params import Params, ParamsSpec

# At and above this many values add_scaled_ may hand a tensor to BLAS axpy.
BLAS_SIZE = 1 << 16
FLOATS = [np.float32, np.float64]


@pytest.fixture
def small() -> Params:
    """Two tensors, global L2 norm sqrt(9 + 16) = 5."""
    return {
        "w": np.array([[3.0, 0.0], [0.0, 0.0]], dtype=np.float32),
        "b": np.array([4.0], dtype=np.float32),
    }


@pytest.fixture
def other() -> Params:
    return {
        "w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
        "b": np.array([-1.0], dtype=np.float32),
    }


# --- structure checks -----------------------------------------------------------------


def test_check_same_structure_accepts_equal_structure(small: Params, other: Params) -> None:
    P.check_same_structure(small, other)  # no error


def test_check_same_structure_ignores_dtype(small: Params) -> None:
    wide = {k: v.astype(np.float64) for k, v in small.items()}
    P.check_same_structure(small, wide)


def test_check_same_structure_names_missing_tensor(small: Params) -> None:
    partial = {"w": small["w"]}
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \[\]"):
        P.check_same_structure(small, partial)


def test_check_same_structure_names_unexpected_tensor(small: Params) -> None:
    extra = {**small, "z": np.zeros(1, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['z'\]"):
        P.check_same_structure(small, extra)


def test_check_same_structure_names_tensor_of_wrong_shape(small: Params) -> None:
    bad = {"w": np.zeros((2, 3), dtype=np.float32), "b": small["b"]}
    with pytest.raises(ValueError, match=r"'w': \(2, 2\) against \(2, 3\)"):
        P.check_same_structure(small, bad)


def test_check_same_structure_refuses_transposed_tensor() -> None:
    a = {"w": np.zeros((2, 3))}
    b = {"w": np.zeros((3, 2))}
    with pytest.raises(ValueError, match="'w'"):
        P.check_same_structure(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_bad_tensor(small: Params, bad: float) -> None:
    small["b"][0] = bad
    with pytest.raises(ValueError, match=r"update tensor 'b' holds NaN or infinite"):
        P.check_finite(small, what="update")


def test_check_finite_default_label_is_params(small: Params) -> None:
    small["w"][1, 1] = np.nan
    with pytest.raises(ValueError, match=r"^params tensor 'w'"):
        P.check_finite(small)


def test_check_finite_accepts_finite(small: Params) -> None:
    P.check_finite(small)


# --- elementwise arithmetic -----------------------------------------------------------


def test_add_known_answer(small: Params, other: Params) -> None:
    out = P.add(small, other)
    np.testing.assert_array_equal(out["w"], [[4.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(out["b"], [3.0])
    assert list(out) == ["w", "b"]


def test_subtract_known_answer(small: Params, other: Params) -> None:
    out = P.subtract(small, other)
    np.testing.assert_array_equal(out["w"], [[2.0, -2.0], [-3.0, -4.0]])
    np.testing.assert_array_equal(out["b"], [5.0])


@pytest.mark.parametrize("op", [P.add, P.subtract])
def test_binary_ops_refuse_mismatched_structure(op: object, small: Params) -> None:
    bad = {"w": small["w"]}
    with pytest.raises(ValueError, match="missing"):
        op(small, bad)  # type: ignore[operator]


@pytest.mark.parametrize("op", [P.add, P.subtract])
def test_binary_ops_do_not_mutate_or_alias(op: object, small: Params, other: Params) -> None:
    a0, b0 = deep_copy(small), deep_copy(other)
    out = op(small, other)  # type: ignore[operator]
    assert_params_equal(small, a0)
    assert_params_equal(other, b0)
    out["w"][0, 0] = 123.0
    assert small["w"][0, 0] == 3.0 and other["w"][0, 0] == 1.0


@pytest.mark.parametrize("dtype", FLOATS)
def test_scale_keeps_dtype_and_values(dtype: type[np.floating]) -> None:
    x = {"a": np.array([1.0, -2.0, 0.5], dtype=dtype)}
    out = P.scale(x, 0.5)
    assert out["a"].dtype == dtype
    np.testing.assert_array_equal(out["a"], [0.5, -1.0, 0.25])
    np.testing.assert_array_equal(x["a"], [1.0, -2.0, 0.5])  # input untouched


def test_l2_norm_known_answer(small: Params) -> None:
    assert P.l2_norm(small) == 5.0


def test_l2_norm_of_empty_params_is_zero() -> None:
    assert P.l2_norm({}) == 0.0


def test_l2_norm_accumulates_float32_in_float64() -> None:
    # 1e20 squared overflows float32 (max ~3.4e38); accumulated in float64 it does not.
    x = {"a": np.array([1e20, 1e20], dtype=np.float32)}
    assert P.l2_norm(x) == pytest.approx(math.sqrt(2) * 1e20, rel=1e-6)


def test_l2_norm_non_contiguous() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    view = base[:, ::2]  # [[0, 2], [4, 6], [8, 10]]
    assert not view.flags.c_contiguous
    assert P.l2_norm({"v": view}) == pytest.approx(math.sqrt(4 + 16 + 36 + 64 + 100))


# --- clip_by_l2 -----------------------------------------------------------------------


def test_clip_scales_down_to_clip_norm(small: Params) -> None:
    clipped, norm = P.clip_by_l2(small, 2.5)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["w"], [[1.5, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(clipped["b"], [2.0])
    assert P.l2_norm(clipped) == pytest.approx(2.5, rel=1e-6)
    assert clipped["w"].dtype == np.float32


def test_clip_inside_ball_returns_equal_copy(small: Params) -> None:
    clipped, norm = P.clip_by_l2(small, 10.0)
    assert norm == 5.0
    assert_params_equal(clipped, small)
    clipped["b"][0] = -1.0
    assert small["b"][0] == 4.0  # a copy, not the input


def test_clip_on_the_boundary_is_unchanged(small: Params) -> None:
    clipped, _ = P.clip_by_l2(small, 5.0)
    assert_params_equal(clipped, small)


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_clip_refuses_bad_clip_norm(small: Params, clip_norm: float) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        P.clip_by_l2(small, clip_norm)


# --- flatten / unflatten --------------------------------------------------------------


def test_flatten_known_answer(small: Params) -> None:
    flat = P.flatten(small)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, [3.0, 0.0, 0.0, 0.0, 4.0])


def test_flatten_respects_dtype_and_non_contiguous() -> None:
    base = np.arange(6, dtype=np.float64).reshape(2, 3)
    x = {"t": base.T, "s": np.array(7.0)}  # a transposed view and a 0-d tensor
    flat = P.flatten(x, dtype=np.float64)
    assert flat.dtype == np.float64
    np.testing.assert_array_equal(flat, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0, 7.0])


def test_unflatten_restores_shapes_dtypes_and_order() -> None:
    spec = ParamsSpec(names=("a", "b"), shapes=((2,), (1, 2)), dtypes=("<f4", "<f8"))
    out = P.unflatten(np.array([1.0, 2.0, 3.0, 4.0]), spec)
    assert list(out) == ["a", "b"]
    assert out["a"].dtype == np.float32 and out["b"].dtype == np.float64
    np.testing.assert_array_equal(out["a"], [1.0, 2.0])
    np.testing.assert_array_equal(out["b"], [[3.0, 4.0]])


def test_unflatten_does_not_alias_the_flat_vector() -> None:
    spec = ParamsSpec(names=("a",), shapes=((3,),), dtypes=("<f8",))
    flat = np.array([1.0, 2.0, 3.0])
    out = P.unflatten(flat, spec)
    out["a"][0] = 9.0
    assert flat[0] == 1.0


@pytest.mark.parametrize(
    "flat",
    [np.zeros(4), np.zeros(6), np.zeros((1, 5)), np.zeros(0)],
    ids=["short", "long", "2-d", "empty"],
)
def test_unflatten_refuses_wrong_shape(small: Params, flat: npt.NDArray[np.float64]) -> None:
    with pytest.raises(ValueError, match=r"does not match params of 5 values"):
        P.unflatten(flat, ParamsSpec.of(small))


def test_params_spec_of(small: Params) -> None:
    spec = ParamsSpec.of(small)
    assert spec.names == ("w", "b")
    assert spec.shapes == ((2, 2), (1,))
    assert spec.dtypes == ("<f4", "<f4")
    assert spec.size == 5 == P.num_values(small)


def test_zeros_like_and_copy(small: Params) -> None:
    z = P.zeros_like(small)
    assert all(z[k].dtype == np.float32 and not z[k].any() for k in small)
    z64 = P.zeros_like(small, dtype=np.float64)
    assert z64["w"].dtype == np.float64
    c = P.copy(small)
    assert_params_equal(c, small)
    c["w"][0, 0] = -7.0
    assert small["w"][0, 0] == 3.0


# --- add_scaled_: the numpy path and the BLAS path ------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_add_scaled_small_known_answer(dtype: type[np.floating]) -> None:
    acc = {"a": np.array([1.0, 2.0], dtype=dtype), "b": np.array([[0.0]], dtype=dtype)}
    x = {"a": np.array([10.0, 20.0], dtype=dtype), "b": np.array([[4.0]], dtype=dtype)}
    a_before = acc["a"]
    P.add_scaled_(acc, x, 0.5)
    assert acc["a"] is a_before  # in place, same array object
    assert acc["a"].dtype == dtype
    np.testing.assert_array_equal(acc["a"], [6.0, 12.0])
    np.testing.assert_array_equal(acc["b"], [[2.0]])
    np.testing.assert_array_equal(x["a"], [10.0, 20.0])  # x untouched


@pytest.mark.parametrize("dtype", FLOATS)
def test_add_scaled_large_takes_blas_and_is_correct(dtype: type[np.floating]) -> None:
    n = BLAS_SIZE + 3
    acc = {"big": np.ones((n,), dtype=dtype).reshape(1, n), "s": np.ones(3, dtype=dtype)}
    x = {"big": np.arange(n, dtype=dtype).reshape(1, n), "s": np.full(3, 2.0, dtype=dtype)}
    x_before = deep_copy(x)
    big_before = acc["big"]
    assert P._axpy(acc["big"], x["big"]) is not None  # the case really goes to BLAS
    P.add_scaled_(acc, x, 0.25)
    assert acc["big"] is big_before
    assert acc["big"].dtype == dtype
    expected = 1.0 + 0.25 * np.arange(n, dtype=np.float64)
    np.testing.assert_allclose(acc["big"][0], expected, rtol=1e-6)
    np.testing.assert_array_equal(acc["s"], [1.5, 1.5, 1.5])
    assert_params_equal(x, x_before)


@pytest.mark.parametrize("dtype", FLOATS)
def test_add_scaled_large_at_exact_threshold(dtype: type[np.floating]) -> None:
    acc = {"t": np.zeros(BLAS_SIZE, dtype=dtype)}
    P.add_scaled_(acc, {"t": np.full(BLAS_SIZE, 3.0, dtype=dtype)}, -2.0)
    assert np.all(acc["t"] == -6.0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_add_scaled_large_non_contiguous_x(dtype: type[np.floating]) -> None:
    n = BLAS_SIZE
    base = np.arange(2 * n, dtype=dtype)
    x = {"t": base[::2]}  # every other value: a strided view
    assert not x["t"].flags.c_contiguous
    acc = {"t": np.ones(n, dtype=dtype)}
    P.add_scaled_(acc, x, 2.0)
    np.testing.assert_allclose(acc["t"], 1.0 + 2.0 * np.arange(0, 2 * n, 2), rtol=1e-6)
    np.testing.assert_array_equal(base, np.arange(2 * n, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_add_scaled_large_non_contiguous_acc_updates_in_place(dtype: type[np.floating]) -> None:
    n = 512
    owner = np.zeros((n, n), dtype=dtype)
    acc = {"t": owner.T}  # a transposed, F-ordered view of ``owner``: n*n >= BLAS_SIZE values
    assert acc["t"].size >= BLAS_SIZE and not acc["t"].flags.c_contiguous
    x = {"t": np.arange(n * n, dtype=dtype).reshape(n, n)}
    P.add_scaled_(acc, x, 1.0)
    # Writing through the view must reach the owner's memory.
    np.testing.assert_array_equal(owner, x["t"].T)


def test_add_scaled_large_mixed_dtypes_take_numpy_path() -> None:
    n = BLAS_SIZE
    acc = {"t": np.ones(n, dtype=np.float32)}
    x = {"t": np.full(n, 0.5, dtype=np.float64)}
    assert P._axpy(acc["t"], x["t"]) is None
    P.add_scaled_(acc, x, 4.0)
    assert acc["t"].dtype == np.float32
    assert np.all(acc["t"] == 3.0)


def test_add_scaled_refuses_mismatched_structure_before_writing() -> None:
    acc = {"a": np.ones(2), "b": np.ones(2)}
    with pytest.raises(ValueError, match="'b'"):
        P.add_scaled_(acc, {"a": np.ones(2), "b": np.ones(3)}, 1.0)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        P.add_scaled_(acc, {"a": np.ones(2)}, 1.0)
    np.testing.assert_array_equal(acc["a"], [1.0, 1.0])  # nothing was added


# --- properties -----------------------------------------------------------------------

_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5)
_values = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def params_of(draw: st.DrawFn, dtype: type[np.floating] | None = None) -> Params:
    n = draw(st.integers(1, 4))
    out: Params = {}
    for i in range(n):
        dt = dtype or draw(st.sampled_from(FLOATS))
        out[f"t{i}"] = draw(hnp.arrays(dt, _shapes, elements=_values))
    return out


@settings(max_examples=150, deadline=None)
@given(x=params_of(), clip_norm=st.floats(1e-3, 1e7))
def test_clip_bounds_the_norm_and_never_scales_up(x: Params, clip_norm: float) -> None:
    x_before = deep_copy(x)
    clipped, norm = P.clip_by_l2(x, clip_norm)
    assert norm == pytest.approx(P.l2_norm(x_before))
    new_norm = P.l2_norm(clipped)
    # float32 rounding of the scaled values may overshoot by a few ulps, no more.
    assert new_norm <= clip_norm * (1 + 1e-6)
    assert new_norm <= norm * (1 + 1e-6)
    if norm <= clip_norm:
        assert_params_equal(clipped, x_before)
    else:
        assert new_norm == pytest.approx(clip_norm, rel=1e-5)
    # Direction is kept: every value is scaled by the same factor in [0, 1].
    for k in x:
        assert clipped[k].dtype == x[k].dtype
        assert np.all(np.abs(clipped[k]) <= np.abs(x[k]))
        assert np.all(clipped[k] * x[k] >= 0)
    assert_params_equal(x, x_before)


@settings(max_examples=100, deadline=None)
@given(x=params_of(np.float32))
def test_unflatten_inverts_flatten_float32(x: Params) -> None:
    x_before = deep_copy(x)
    back = P.unflatten(P.flatten(x), ParamsSpec.of(x))
    assert_params_equal(back, x)
    assert_params_equal(x, x_before)


@settings(max_examples=100, deadline=None)
@given(x=params_of())
def test_unflatten_inverts_flatten_float64_vector(x: Params) -> None:
    # Mixed float32/float64 params survive a float64 flat vector exactly.
    back = P.unflatten(P.flatten(x, dtype=np.float64), ParamsSpec.of(x))
    assert_params_equal(back, x)


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    factor=st.floats(-10, 10, allow_nan=False),
)
def test_pure_ops_never_mutate_inputs(data: st.DataObject, factor: float) -> None:
    a = data.draw(params_of(np.float64))
    b = {k: data.draw(hnp.arrays(np.float64, v.shape, elements=_values)) for k, v in a.items()}
    a0, b0 = deep_copy(a), deep_copy(b)
    P.add(a, b)
    P.subtract(a, b)
    P.scale(a, factor)
    P.l2_norm(a)
    P.flatten(a)
    P.copy(a)
    P.check_finite(a)
    P.check_same_structure(a, b)
    acc = P.zeros_like(a)
    P.add_scaled_(acc, b, factor)
    assert_params_equal(a, a0)
    assert_params_equal(b, b0)
    for k in a:
        np.testing.assert_allclose(acc[k], factor * b[k], rtol=1e-12, atol=0)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_add_then_subtract_round_trips(data: st.DataObject) -> None:
    a = data.draw(params_of(np.float64))
    b = {k: data.draw(hnp.arrays(np.float64, v.shape, elements=_values)) for k, v in a.items()}
    back = P.subtract(P.add(a, b), b)
    for k in a:
        np.testing.assert_allclose(back[k], a[k], rtol=0, atol=1e-9 * (1 + np.abs(b[k]).max()))

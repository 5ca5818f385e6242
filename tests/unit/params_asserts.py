"""Assertions on params shared by the unit tests (independent of fedge.params, which they test)."""

from __future__ import annotations

import numpy as np

from fedge.params import Params


def deep_copy(params: Params) -> Params:
    """A snapshot to compare against after a call that must not mutate its input."""
    return {k: v.copy() for k, v in params.items()}


def assert_params_equal(a: Params, b: Params) -> None:
    """Same names in order, shapes, dtypes and values."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_params_close(a: Params, b: Params, *, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """Same names in order and shapes; values within tolerance."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)

"""The generated modules' matrix product: BLAS's gemm called directly (``_matmul`` and
``_matmul_into`` in ``templates/_header.py.j2``), instead of Numba's ``np.dot``.

Compared with NumPy's product (float64: to 1e-12; float32: to 1e-5 relative) for every layout the
lowering passes (row-major, a transposed view, a slice with a row stride, a product written into a
slice of a larger array), at sizes distinct from each other and from 2, in both dtypes; then the
edge cases (one row, one column, an empty sum, no rows) and the errors a wrong call gets.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from numba import njit

from chainrule.codegen.render import render_header

M, K, N = 7, 5, 3
TOL = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture(scope="module", params=["float64", "float32"])
def header(request, tmp_path_factory):
    """The header of a generated module in ``dtype``, imported (compiled in memory)."""
    dtype = request.param
    path = tmp_path_factory.mktemp("header") / f"header_{dtype}.py"
    path.write_text(render_header(dtype, cache=False))
    spec = importlib.util.spec_from_file_location(f"header_{dtype}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.dtype = dtype
    return module


def _random(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _layouts(x, seed):
    """``x`` as the lowering's views hold it: row-major, the transpose of a row-major array, and a
    slice of a wider array (a row stride larger than a row)."""
    wide = _random((x.shape[0] + 2, x.shape[1] + 3), x.dtype, seed)
    wide[1:1 + x.shape[0], 2:2 + x.shape[1]] = x
    return {"row-major": x, "transposed view": np.ascontiguousarray(x.T).T,
            "row slice": wide[1:1 + x.shape[0], 2:2 + x.shape[1]]}


def _close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_product_of_every_layout_pair(header):
    dtype = header.dtype
    a, b = _random((M, K), dtype, 1), _random((K, N), dtype, 2)
    want = a.astype(np.float64) @ b.astype(np.float64)
    for a_name, a_view in _layouts(a, 3).items():
        for b_name, b_view in _layouts(b, 4).items():
            got = header._matmul(a_view, b_view)
            assert got.flags.c_contiguous, (a_name, b_name)
            _close(got, want.astype(dtype), dtype)


def test_product_written_into_a_slice_leaves_the_rest(header):
    """``_matmul_into`` writes the product into a slice of a larger array (a batch element's block,
    a (b, h) slice of attention's scores) and nothing else of it."""
    dtype = header.dtype

    @njit
    def into(a, b, out):
        header._matmul_into(a, b.T, out[1, :, 2:2 + b.shape[0]])

    a, b = _random((M, K), dtype, 5), _random((N, K), dtype, 6)
    out = np.full((3, M, N + 4), 7.0, dtype=dtype)
    into(a, b, out)
    _close(out[1, :, 2:2 + N], (a.astype(np.float64) @ b.T.astype(np.float64)).astype(dtype), dtype)
    rest = out.copy()
    rest[1, :, 2:2 + N] = 7.0
    assert np.all(rest == 7.0)


@pytest.mark.parametrize("m,k,n", [(1, K, N), (M, K, 1), (M, 1, N), (1, 1, 1)])
def test_a_single_row_column_or_term(header, m, k, n):
    dtype = header.dtype
    a, b = _random((m, k), dtype, 7), _random((k, n), dtype, 8)
    for b_view in _layouts(b, 9).values():
        _close(header._matmul(a, b_view), (a.astype(np.float64) @ b.astype(np.float64)).astype(dtype), dtype)


def test_an_empty_sum_is_zero_and_no_rows_is_empty(header):
    dtype = header.dtype
    got = header._matmul(np.ones((M, 0), dtype), np.ones((0, N), dtype))
    assert got.shape == (M, N) and np.all(got == 0.0)
    assert header._matmul(np.ones((0, K), dtype), np.ones((K, N), dtype)).shape == (0, N)


def test_wrong_shapes_and_unreadable_strides_are_errors(header):
    dtype = header.dtype
    with pytest.raises(ValueError, match="the shapes do not match"):
        header._matmul(np.ones((M, K), dtype), np.ones((K + 1, N), dtype))
    stepped = np.ones((2 * M, 2 * K), dtype)[::2, ::2]      # a step along both axes: no BLAS layout
    with pytest.raises(ValueError, match="neither row- nor column-major"):
        header._matmul(stepped, np.ones((K, N), dtype))

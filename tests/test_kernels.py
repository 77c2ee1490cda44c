"""Reduce/finalize kernels against numpy and exact integer references."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.algorithms import kernels
from pccl.enums import ReduceOp

DTYPES = ["float32", "float64", "int8", "int16", "int32", "int64", "uint8"]
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8"]
REF = {ReduceOp.SUM: np.add, ReduceOp.AVG: np.add, ReduceOp.PROD: np.multiply,
       ReduceOp.MIN: np.minimum, ReduceOp.MAX: np.maximum}


def random_array(rng: np.random.Generator, dtype: str, n: int) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.standard_normal(n) * 100).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dt)


def trunc_div(v: int, n: int) -> int:
    q = abs(v) // n
    return q if v >= 0 else -q


def wrap(v: int, dtype: str) -> int:
    info = np.iinfo(np.dtype(dtype))
    span = 1 << (8 * np.dtype(dtype).itemsize)
    v = (v - info.min) % span + info.min
    return v


def test_every_op_has_a_kernel():
    assert set(ReduceOp) == set(REF)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(ReduceOp))
def test_reduce_into_matches_numpy(op, dtype):
    rng = np.random.default_rng(DTYPES.index(dtype) * 10 + list(ReduceOp).index(op))
    a, b = random_array(rng, dtype, 1000), random_array(rng, dtype, 1000)
    # include the dtype's extremes so integer overflow wraps like numpy
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(np.dtype(dtype))
        a[:4] = [info.min, info.max, info.max, info.min]
        b[:4] = [info.min, info.max, 1, info.max]
    want = REF[op](a, b)
    out = np.empty_like(a)
    with np.errstate(all="ignore"):
        kernels.reduce_into(op, a, b, out)
    assert out.dtype == a.dtype
    assert out.tobytes() == want.tobytes()
    # out may alias mine
    mine = a.copy()
    with np.errstate(all="ignore"):
        kernels.reduce_into(op, mine, b, mine)
    assert mine.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", [o for o in ReduceOp if o is not ReduceOp.AVG])
def test_finalize_is_identity_except_avg(op, dtype):
    x = random_array(np.random.default_rng(1), dtype, 100)
    before = x.tobytes()
    kernels.finalize(op, x, 7)
    assert x.tobytes() == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_world_one_and_empty_are_identity(dtype):
    x = random_array(np.random.default_rng(2), dtype, 50)
    before = x.tobytes()
    kernels.finalize(ReduceOp.AVG, x, 1)
    assert x.tobytes() == before
    e = np.empty(0, dtype=dtype)
    kernels.finalize(ReduceOp.AVG, e, 5)
    assert e.size == 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("world", [2, 3, 7, 16, 1000])
def test_float_avg_divides(dtype, world):
    x = random_array(np.random.default_rng(world), dtype, 500)
    want = x / np.dtype(dtype).type(world)
    kernels.finalize(ReduceOp.AVG, x, world)
    assert x.dtype == np.dtype(dtype)
    assert x.tobytes() == want.astype(dtype).tobytes()


@pytest.mark.parametrize("dtype", INT_DTYPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), world=st.integers(2, 127))
def test_integer_avg_truncates_toward_zero(dtype, data, world):
    info = np.iinfo(np.dtype(dtype))
    values = data.draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=1, max_size=40))
    values += [int(info.min), int(info.max), -world if info.min < 0 else world, world - 1, 0]
    values = [v for v in values if info.min <= v <= info.max]
    x = np.array(values, dtype=dtype)
    kernels.finalize(ReduceOp.AVG, x, world)
    assert [int(v) for v in x] == [trunc_div(v, world) for v in values]


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64"])
def test_integer_avg_negative_examples(dtype):
    x = np.array([-7, -6, -5, -1, 0, 1, 5, 6, 7], dtype=dtype)
    kernels.finalize(ReduceOp.AVG, x, 3)
    assert x.tolist() == [-2, -2, -1, 0, 0, 0, 1, 2, 2]


def test_int64_extremes():
    lo, hi = -(1 << 63), (1 << 63) - 1
    for world in (2, 3, 5, 16, 1000, (1 << 62) + 1, hi):
        x = np.array([lo, lo + 1, hi, hi - 1, -1, 1], dtype=np.int64)
        kernels.finalize(ReduceOp.AVG, x, world)
        assert [int(v) for v in x] == [trunc_div(v, world) for v in (lo, lo + 1, hi, hi - 1, -1, 1)], world


@pytest.mark.parametrize("dtype", INT_DTYPES)
@settings(max_examples=20, deadline=None)
@given(data=st.data(), world=st.integers(2, 9))
def test_integer_avg_is_wrapped_sum_then_truncated_division(dtype, data, world):
    """The ring's AVG: reduce with the kernel across ranks (wrapping), then finalize once."""
    info = np.iinfo(np.dtype(dtype))
    n = data.draw(st.integers(1, 20))
    ranks = [data.draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=n, max_size=n))
             for _ in range(world)]
    acc = np.array(ranks[0], dtype=dtype)
    with np.errstate(all="ignore"):
        for r in ranks[1:]:
            kernels.reduce_into(ReduceOp.AVG, np.array(r, dtype=dtype), acc, acc)
    kernels.finalize(ReduceOp.AVG, acc, world)
    want = [trunc_div(wrap(sum(col), dtype), world) for col in zip(*ranks)]
    assert [int(v) for v in acc] == want


@pytest.mark.parametrize("dtype,world", [("int8", 128), ("int8", 200), ("uint8", 256), ("int16", 40000)])
def test_integer_avg_with_world_larger_than_dtype_max(dtype, world):
    """Regression: finalize built x.dtype.type(world), an OverflowError for int8 AVG with 128+ peers."""
    info = np.iinfo(np.dtype(dtype))
    values = sorted({int(info.min), int(info.min) + 1, -1, 0, 1, int(info.max)} & set(range(info.min, info.max + 1)))
    x = np.array(values, dtype=dtype)
    kernels.finalize(ReduceOp.AVG, x, world)
    assert [int(v) for v in x] == [trunc_div(v, world) for v in values]

"""Elementwise reduce and finalize kernels on numpy arrays (all release the GIL).

Integer reductions wrap around on overflow (like torch and numpy); integer AVG is the sum divided
by the world size, truncated toward zero. 16-bit floats are reduced by the caller in float32.
"""
from __future__ import annotations

import numpy as np

from pccl.enums import ReduceOp

_UFUNC = {
    ReduceOp.SUM: np.add,
    ReduceOp.AVG: np.add,
    ReduceOp.PROD: np.multiply,
    ReduceOp.MIN: np.minimum,
    ReduceOp.MAX: np.maximum,
}


def reduce_into(op: ReduceOp, mine: np.ndarray, received: np.ndarray, out: np.ndarray) -> None:
    """out = op(mine, received), elementwise. ``out`` may alias ``mine``."""
    _UFUNC[op](mine, received, out=out)


def finalize(op: ReduceOp, x: np.ndarray, world: int) -> None:
    """Post-process a fully reduced piece in place (only AVG does anything)."""
    if op is not ReduceOp.AVG or world == 1 or x.size == 0:
        return
    if x.dtype.kind == "f":
        np.divide(x, x.dtype.type(world), out=x)
    elif world > np.iinfo(x.dtype).max:  # the divisor does not fit the dtype: divide in int64
        wide = x.astype(np.int64)
        finalize(op, wide, world)
        np.copyto(x, wide, casting="unsafe")
    elif x.dtype.kind == "u":
        np.floor_divide(x, x.dtype.type(world), out=x)
    else:  # signed: floor division, then round toward zero for negative inexact quotients
        n = x.dtype.type(world)
        neg_inexact = (x < 0) & (np.remainder(x, n) != 0)
        np.floor_divide(x, n, out=x)
        np.add(x, neg_inexact.astype(x.dtype), out=x)

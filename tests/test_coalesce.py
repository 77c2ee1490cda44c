"""pccl.coalesce: bucket planning (pure, property-tested) and gathering/scattering of one bucket."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl import coalesce
from pccl.errors import InvalidUsage


def test_small_tensors_share_buckets_per_kind_in_list_order():
    sizes = [10, 10, 50, 10, 100, 10, 10]
    kinds = ["f", "d", "f", "f", "f", "d", None]
    # cap 64: "f" 10+50 fits, the next 10 opens a new bucket; 100 >= cap stands alone; None alone.
    assert coalesce.plan(sizes, kinds, 64) == [[0, 2], [1, 5], [3], [4], [6]]
    assert coalesce.plan(sizes, kinds, 0) == [[i] for i in range(7)]
    assert coalesce.plan([], [], 64) == []
    assert coalesce.plan([0, 0, 64, 63, 1], ["f"] * 5, 64) == [[0, 1, 3, 4], [2]]
    with pytest.raises(ValueError):
        coalesce.plan([1], [], 64)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.sampled_from(["f", "d", "h", None])), max_size=60),
       st.integers(0, 256))
def test_plan_properties(items, cap):
    sizes, kinds = [s for s, _ in items], [k for _, k in items]
    buckets = coalesce.plan(sizes, kinds, cap)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(items)))  # every position exactly once
    assert [b[0] for b in buckets] == sorted(b[0] for b in buckets)
    for b in buckets:
        assert b == sorted(b)
        if len(b) > 1:
            assert cap > 0 and len({kinds[i] for i in b}) == 1 and kinds[b[0]] is not None
            assert sum(sizes[i] for i in b) <= cap and all(sizes[i] < cap for i in b)
    # deterministic: every peer computes the same buckets from the same list
    assert coalesce.plan(sizes, kinds, cap) == buckets


def test_bucket_gathers_and_scatters_only_on_request():
    a = np.arange(5, dtype=np.float32)
    b = np.arange(3, dtype=np.float32).reshape(3, 1) + 10
    before = a.copy(), b.copy()
    bucket = coalesce.Bucket([a, b], ["tensors[0]", "tensors[1]"])
    assert bucket.src.tolist() == [0, 1, 2, 3, 4, 10, 11, 12]
    bucket.src[:] = -1  # the private input: the user's tensors stay as they were
    bucket.dst[:] = np.arange(8) * 2
    assert (a == before[0]).all() and (b == before[1]).all()
    bucket.scatter()
    assert a.tolist() == [0, 2, 4, 6, 8] and b.ravel().tolist() == [10, 12, 14]
    with pytest.raises(InvalidUsage, match="tensors\\[1\\]"):
        coalesce.Bucket([a, np.zeros(3, dtype=np.complex64)], ["tensors[0]", "tensors[1]"])


def test_sizes_and_kinds_of_numpy_and_torch_without_staging():
    assert coalesce.describe(np.zeros((2, 3), np.float16))[:2] == (12, "float16")
    assert coalesce.describe("not a tensor") == (0, "", 0)
    torch = pytest.importorskip("torch")
    assert coalesce.describe(torch.zeros(4, dtype=torch.bfloat16))[:2] == (8, "bfloat16")

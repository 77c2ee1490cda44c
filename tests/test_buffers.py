import numpy as np

from pccl.buffers import BufferPool


def test_pool_reuses_memory_and_stays_bounded():
    pool = BufferPool(max_free=2)
    a = pool.take(1000)
    assert a.size == 1000 and a.dtype == np.uint8
    pool.give(a)
    b = pool.take(800)  # served from a's memory
    assert b.size == 800 and np.shares_memory(a, b)
    pool.give(b)
    pool.give(b)  # giving twice keeps one entry
    c, d, e = pool.take(10), pool.take(20), pool.take(30)
    assert not np.shares_memory(c, d)
    for x in (c, d, e):
        pool.give(x)
    assert len(pool._free) == 2  # bounded: the smallest was dropped
    assert min(x.size for x in pool._free) >= 20

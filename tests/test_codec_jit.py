"""The compiled codec kernels (algorithms/codec_jit.py) against the numpy reference: same bytes,
same bits (encode, decode, decode_add, the owner's fused adopt), same errors; and when the kernels load (lazily, in the background, never for small
chunks, not at all with PCCL_CODEC_JIT=0); and the backup's non-temporal copy, byte for byte."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pccl.algorithms import codecs as C
from pccl.enums import Quantization as Q
from pccl.errors import InvalidUsage

JIT_CODECS = [Q.UINT8, Q.INT8, Q.FP4, Q.FP16, Q.BF16]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert C.load_kernels(), f"the compiled kernels did not load: {C.KERNELS.error!r}"


@contextlib.contextmanager
def path(compiled: bool):
    """Force the compiled kernels (for any chunk size) or the numpy reference."""
    saved_module, saved_after = C.KERNELS.module, C.JIT_AFTER
    if compiled:
        C.JIT_AFTER = 0
    else:
        C.KERNELS.module = None
        C.JIT_AFTER = 1 << 62
    try:
        yield
    finally:
        C.KERNELS.module, C.JIT_AFTER = saved_module, saved_after


def both(fn):
    with path(False):
        ref = fn()
    with path(True):
        got = fn()
    return ref, got


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def check_identical(codec: Q, x: np.ndarray) -> None:
    enc_ref, enc_got = both(lambda: C.encode(codec, x))
    assert bits(enc_ref) == bits(enc_got), "encoded bytes differ"

    def adopt():
        y = x.copy()
        return C.adopt(codec, y), y
    (a_enc_ref, a_ref), (a_enc_got, a_got) = both(adopt)  # the owner's fused encode + decode
    assert bits(a_enc_ref) == bits(a_enc_got) == bits(enc_ref), "adopt's bytes differ"
    assert bits(a_ref) == bits(a_got) == bits(C.decode(codec, enc_ref)), "adopted values differ"
    for blob in (enc_ref, bytes(enc_ref)):  # writable array and read-only bytes from the network
        dec_ref, dec_got = both(lambda: C.decode(codec, blob))
        assert bits(dec_ref) == bits(dec_got), "decoded bits differ"
        acc = np.random.default_rng(x.size).standard_normal(x.size).astype(np.float32)

        def add(acc=acc, blob=blob):
            a = acc.copy()
            C.decode_add(codec, blob, a)
            return a
        add_ref, add_got = both(add)
        assert bits(add_ref) == bits(add_got), "decode_add bits differ"


def refused_alike(codec: Q, x: np.ndarray, match: str) -> None:
    """Both paths raise InvalidUsage for x, with the same message."""
    msgs = []
    for compiled in (False, True):
        with path(compiled), pytest.raises(InvalidUsage, match=match) as info:
            C.encode(codec, x)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
arrays = hnp.arrays(np.float32, st.integers(1, 700), elements=finite32)


@pytest.mark.parametrize("codec", JIT_CODECS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays, scale=st.sampled_from([1.0, 1e-30, 1e-3, 1e3, 1e30]))
def test_compiled_kernels_match_the_reference_bit_for_bit(codec, x, scale):
    with np.errstate(over="ignore", under="ignore"):
        x = (x * np.float32(scale)).astype(np.float32)
    x[~np.isfinite(x)] = 1.0
    try:
        with path(False):
            C.encode(codec, x)
    except InvalidUsage:  # too close to the float32 limit for this codec: both must say so
        with path(True), pytest.raises(InvalidUsage):
            C.encode(codec, x)
        return
    check_identical(codec, x)


@pytest.mark.parametrize("codec", JIT_CODECS)
@pytest.mark.parametrize("case", ["normal", "positive", "negative", "constant", "zeros", "negzeros", "mixedzeros",
                                  "subnormal", "ties", "odd", "huge"])
def test_hand_picked_chunks_match(codec, case):
    rng = np.random.default_rng(7)
    n = 128 * 9 + 77
    x = rng.standard_normal(n).astype(np.float32)
    if case == "positive":
        x = np.abs(x) + 1
    elif case == "negative":
        x = -np.abs(x) - 1
    elif case == "constant":
        x[:] = -3.25
    elif case == "zeros":
        x[:] = 0.0
    elif case == "negzeros":
        x[:] = -0.0
    elif case == "mixedzeros":
        x[:] = 0.0
        x[::3] = -0.0
    elif case == "subnormal":
        x *= np.float32(1e-40)
    elif case == "ties":
        x = (np.arange(n) % 255 - 127).astype(np.float32) * np.float32(0.5)  # exact .5 multiples of the step
    elif case == "odd":
        x = x[:n - 2 * (n % 2 == 0)]
    elif case == "huge":
        x *= np.float32(1e36)
    if codec is Q.FP16 and case == "huge":  # beyond float16: both paths refuse it the same way
        refused_alike(codec, x, "overflows fp16")
        return
    check_identical(codec, x)
    if case == "negzeros" and codec is Q.UINT8:
        with path(True):
            assert bits(C.roundtrip(codec, x)) == bits(x)  # a constant chunk is exact, sign included


@pytest.mark.parametrize("codec", JIT_CODECS)
@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused_the_same_way(codec, bad):
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    x[617] = bad
    refused_alike(codec, x, "NaN/inf at index 617")
    for compiled in (False, True):
        with path(compiled):
            assert C.first_nonfinite(x) == 617
    x[617] = 0.5
    with path(True):
        assert C.first_nonfinite(x) is None


def test_minmax_agrees_on_signed_zeros_and_extremes():
    cases = [[1, 2, 3], [-0.0, 0.0], [0.0, -0.0], [-0.0, -0.0], [-5, -1], [3e38, -3e38], [1e-45, -1e-45],
             [-np.inf, 1], [1, np.inf]]
    for v in cases:
        x = np.array(v, np.float32)
        ref, got = both(lambda x=x: C._minmax(x))
        assert [bits(np.float32(a)) for a in ref] == [bits(np.float32(a)) for a in got], v
    for v in ([np.nan, 1], [1, -np.nan]):
        ref, got = both(lambda v=v: C._minmax(np.array(v, np.float32)))
        assert np.isnan(ref).all() and np.isnan(got).all()


def _python(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_small_chunks_never_load_numba_and_a_large_one_loads_it_in_the_background():
    code = """
import sys, numpy as np
from pccl.algorithms import codecs as C
x = np.ones(C.JIT_AFTER - 1, np.float32)
C.decode(C.Q.UINT8, C.encode(C.Q.UINT8, x))
print("numba" in sys.modules, C.KERNELS.module is not None)
y = np.ones(C.JIT_AFTER, np.float32)
first = C.encode(C.Q.FP4, y)  # starts the loader, runs the numpy code meanwhile
print(C.load_kernels(), "numba" in sys.modules)
print(bytes(first) == bytes(C.encode(C.Q.FP4, y)))
"""
    assert _python(code).split() == ["False", "False", "True", "True", "True"]


def test_pccl_codec_jit_0_keeps_the_numpy_reference():
    code = """
import sys, numpy as np
from pccl.algorithms import codecs as C
y = np.linspace(-2, 2, C.JIT_AFTER, dtype=np.float32)
enc = C.encode(C.Q.UINT8, y)
print(C.load_kernels(5), "numba" in sys.modules, repr(C.KERNELS.error))
print(np.abs(C.decode(C.Q.UINT8, enc) - y).max() <= float(enc[12:16].view(np.float32)[0]) / 2 * 1.001)
"""
    assert _python(code, PCCL_CODEC_JIT="0").splitlines() == ["False False ImportError('PCCL_CODEC_JIT=0')", "True"]


def test_a_child_forked_while_the_kernels_load_keeps_numpy_and_does_not_wait():
    code = """
import os, sys, time, numpy as np
from pccl.algorithms import codecs as C
C.KERNELS.start()  # the loader thread is busy importing numba when we fork
pid = os.fork()
if pid == 0:
    t = time.monotonic()
    ok = C.load_kernels(60)
    x = np.linspace(-1, 1, C.JIT_AFTER, dtype=np.float32)
    good = C.decode(C.Q.UINT8, C.encode(C.Q.UINT8, x)).shape == x.shape
    os._exit(0 if not ok and good and time.monotonic() - t < 5 and "forked" in str(C.KERNELS.error) else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), C.load_kernels(240))
"""
    assert _python(code) == "0 True"


PEER = """
import hashlib, json, sys, time
import numpy as np
import pccl
from pccl.algorithms import codecs as C
compiled = C.load_kernels(240)
c = pccl.Communicator(sys.argv[1]).connect()
end = time.monotonic() + 120
while c.world_size < 2 and time.monotonic() < end:
    c.update_topology()
out = {"compiled": compiled, "digests": {}}
for q in ("uint8", "int8", "fp4", "fp16", "bf16"):
    x = np.random.default_rng(c.rank + 7).standard_normal(3 * C.JIT_AFTER + 5).astype(np.float32)
    c.all_reduce(x, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization(q), timeout=120)
    out["digests"][q] = hashlib.sha256(x.tobytes()).hexdigest()
c.close()
print(json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_a_peer_with_compiled_kernels_and_one_without_end_bit_identical():
    """The kernels are an implementation detail: a peer running numpy codecs (PCCL_CODEC_JIT=0)
    and one running the compiled kernels reduce to the same bits, in every codec."""
    import json

    import pccl

    with pccl.Master("127.0.0.1", 0) as m:
        procs = [subprocess.Popen([sys.executable, "-c", PEER, m.address], stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PCCL_CODEC_JIT=flag)) for flag in ("1", "0")]
        try:
            outs = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
        finally:
            for p in procs:
                p.kill()
    assert [o["compiled"] for o in outs] == [True, False]
    assert outs[0]["digests"] == outs[1]["digests"]


# ---------------------------------------------------------------- the backup's non-temporal copy

def copy_nt():
    """codec_jit.copy_nt, or skip where there is none (machines other than x86-64)."""
    from pccl.algorithms import codec_jit

    if codec_jit.copy_nt is None:
        pytest.skip("non-temporal stores are compiled on x86-64 only")
    return codec_jit.copy_nt


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 300), dst_off=st.integers(0, 64), src_off=st.integers(0, 64))
def test_copy_nt_copies_exactly_and_writes_nothing_else(n, dst_off, src_off):
    """Every alignment of both ends and every length around the 32-byte vector (head, body and
    tail loops): the destination gets the source's bytes and nothing around it changes."""
    kernel = copy_nt()
    rng = np.random.default_rng(n * 4096 + dst_off * 64 + src_off)
    src = rng.integers(0, 256, n + 128, dtype=np.uint8)
    dst = rng.integers(0, 256, n + 128, dtype=np.uint8)
    before = dst.copy()
    kernel(dst[dst_off:dst_off + n], src[src_off:src_off + n])
    assert dst[dst_off:dst_off + n].tobytes() == src[src_off:src_off + n].tobytes()
    assert dst[:dst_off].tobytes() == before[:dst_off].tobytes()
    assert dst[dst_off + n:].tobytes() == before[dst_off + n:].tobytes()


def test_copy_nt_uses_non_temporal_stores():
    """(Compiled afresh: numba cannot show the machine code of a kernel loaded from its cache.)"""
    import numba

    fresh = numba.njit(nogil=True)(copy_nt().py_func)
    a = np.zeros(100, np.uint8)
    fresh(a, a.copy())
    asm = "\n".join(fresh.inspect_asm().values())
    assert "movnt" in asm and "sfence" in asm

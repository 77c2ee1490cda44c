"""Compiled (numba) kernels for :mod:`algorithms.codecs`: the same float32 arithmetic, fused
(every codec but NONE: UINT8, INT8, FP4, FP16, BF16).

The numpy code in ``codecs`` is the reference: every kernel here performs, per element, the very
same sequence of IEEE float32 operations (division, round-half-to-even, one multiply, at most one
add/subtract, no fused multiply-add, no float64 intermediates) and the same integer bit
manipulations, so its output is bit-identical to the reference; ``tests/test_codec_jit.py`` checks
that on every codec. A peer with numba and one without therefore still end bit-identical.

What fusing buys: the reference makes 5-8 passes over each 256 KiB block, every one a numpy call
that re-reads its input; a kernel makes one (plus one min/max scan), and runs with the GIL
released, so the lane threads of one process encode and decode in parallel.

One kernel here is not a codec: :func:`copy_nt`, the copy with which an in-place op's backup
puts the caller's input aside (:mod:`algorithms.backup`). It shares the loader and the cache.

Loaded lazily on the first quantized call or large in-place op (importing numba costs ~0.5-1.5
s); compiled once per machine and cached next to this file (``cache=True``; numba falls back to a
user cache directory where that is not writable). ``PCCL_CODEC_JIT=0`` turns the kernels off.
"""
from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_JIT = dict(nogil=True, cache=True, fastmath=False, boundscheck=False)

_F0, _F1 = np.float32(0.0), np.float32(1.0)


@numba.njit(**_JIT)
def minmax_keys(xbits):  # pragma: no cover - compiled
    """(min, max) of the order keys k = b ^ ((b >> 31) & 0x7FFFFFFF) of int32 float bits ``xbits``:
    signed-integer order of the keys is float order (with -0.0 < +0.0, NaN beyond +-inf), and an
    integer min/max reduction vectorizes where a float one (NaN rules) does not."""
    lo = np.int32(0x7FFFFFFF)
    hi = np.int32(-0x7FFFFFFF - 1)
    for i in range(xbits.size):
        b = xbits[i]
        k = b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))
        lo = min(lo, k)
        hi = max(hi, k)
    return lo, hi


@numba.njit(**_JIT)
def enc_affine(x, q, zp, s, off, qmin, qmax, adopt):  # pragma: no cover - compiled
    """q = clip(rint((x - off) / s) + zp, qmin, qmax); ``off`` and ``zp`` only when non-zero.
    ``adopt``: also overwrite x with what q decodes to, (q - zp) * s + off (see dec_affine)."""
    s32, off32, zp32 = np.float32(s), np.float32(off), np.float32(zp)
    lo32, hi32 = np.float32(qmin), np.float32(qmax)
    use_off, use_zp = off != 0.0, zp != 0
    for i in range(x.size):
        t = x[i]
        if use_off:
            t = t - off32
        t = np.rint(t / s32)
        if use_zp:
            t = t + zp32
        if t < lo32:
            t = lo32
        elif t > hi32:
            t = hi32
        q[i] = np.int32(t)
        if adopt:  # t is the code as a float32 (exact), but -0.0 must become the integer 0's +0.0
            t = t + _F0
            if use_zp:
                t = t - zp32
            t = t * s32
            if use_off:
                t = t + off32
            x[i] = t


@numba.njit(**_JIT)
def dec_affine(q, zp, s, off, dst, add):  # pragma: no cover - compiled
    """dst = (q - zp) * s + off as float32 (the reference's op order; zp and off only when
    non-zero, so INT8 is q * s); dst += that when ``add``. ``q``: uint8 or int8 codes."""
    s32, off32, zp32 = np.float32(s), np.float32(off), np.float32(zp)
    use_off, use_zp = off != 0.0, zp != 0
    for i in range(dst.size):
        v = np.float32(q[i])
        if use_zp:
            v = v - zp32
        v = v * s32
        if use_off:
            v = v + off32
        if add:
            dst[i] = dst[i] + v
        else:
            dst[i] = v


@numba.njit(**_JIT)
def enc_fp4(x, xbits, scales, sbits, packed, y, ybits, nib, table, adopt):  # pragma: no cover - compiled
    """Block-scaled E3M0 (codecs module docstring). ``xbits``/``sbits``/``ybits`` are uint32 views
    of ``x``/``scales``/``y``; ``y`` (float32) and ``nib`` (uint8) are 128-value scratch blocks.
    ``adopt``: also overwrite x with the decoded values, table[nibble] * scale (see dec_fp4).
    Returns False at once on NaN/inf input. Branch-free inner loops, so they vectorize."""
    n = x.size
    for b in range((n + 127) // 128):
        i0 = b * 128
        m = min(128, n - i0)
        amax = np.uint32(0)
        for i in range(m):
            amax = max(amax, xbits[i0 + i] & np.uint32(0x7FFFFFFF))
        if amax >= np.uint32(0x7F800000):
            return False
        sbits[b] = amax
        div = scales[b] if scales[b] > _F0 else _F1
        for i in range(m):
            y[i] = np.abs(x[i0 + i]) / div
        for i in range(m):
            yb = ybits[i]
            k = min(max((yb + np.uint32(1 << 22)) >> np.uint32(23), np.uint32(121)), np.uint32(127))
            k = (k - np.uint32(120)) | ((xbits[i0 + i] >> np.uint32(28)) & np.uint32(8))
            nib[i] = np.uint8(k * np.uint32(yb >= np.uint32(120 << 23)))  # y < 2^-7: nibble 0
        if m % 2:
            nib[m] = 0
        for p in range((m + 1) // 2):
            packed[i0 // 2 + p] = (nib[2 * p] << np.uint8(4)) | nib[2 * p + 1]
        if adopt:
            sb = scales[b]
            for i in range(m):
                x[i0 + i] = table[nib[i]] * sb
    return True


@numba.njit(**_JIT)
def dec_fp4(scales, packed, table, dst, add):  # pragma: no cover - compiled
    """dst = table[nibble] * scale of its block (exact: a power of two times the scale)."""
    n = dst.size
    for b in range((n + 127) // 128):
        i0 = b * 128
        m = min(128, n - i0)
        sb = scales[b]
        for p in range(m // 2):
            byte = packed[i0 // 2 + p]
            v0 = table[byte >> np.uint8(4)] * sb
            v1 = table[byte & np.uint8(15)] * sb
            if add:
                dst[i0 + 2 * p] = dst[i0 + 2 * p] + v0
                dst[i0 + 2 * p + 1] = dst[i0 + 2 * p + 1] + v1
            else:
                dst[i0 + 2 * p] = v0
                dst[i0 + 2 * p + 1] = v1
        if m % 2:
            v0 = table[packed[(i0 + m) // 2] >> np.uint8(4)] * sb
            dst[i0 + m - 1] = dst[i0 + m - 1] + v0 if add else v0


@numba.njit(**_JIT)
def enc_bf16(xbits, u16, adopt):  # pragma: no cover - compiled
    """u16 = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 (round to nearest even on the bits); ``adopt``:
    also set x's bits to u16 << 16, the decoded value."""
    for i in range(xbits.size):
        b = xbits[i]
        h = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        u16[i] = np.uint16(h)
        if adopt:
            xbits[i] = h << np.uint32(16)


@numba.njit(**_JIT)
def dec_bf16(u16, dst, add):  # pragma: no cover - compiled
    """dst = the float32 with bits u16 << 16 (dst += that when ``add``)."""
    for i in range(dst.size):
        v = np.uint32(np.uint32(u16[i]) << np.uint32(16)).view(np.float32)
        dst[i] = dst[i] + v if add else v


@numba.njit(**_JIT)
def _fp16_value(h):  # pragma: no cover - compiled
    """What codecs decodes an fp16 code to: magnitude bits << 13 as a float32, times 2^112, with
    the sign bit or-ed in afterwards."""
    m = np.float32(np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13)).view(np.float32) * np.float32(2.0 ** 112))
    return np.uint32(m.view(np.uint32) | ((h & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@numba.njit(**_JIT)
def enc_fp16(x, xbits, u16, adopt):  # pragma: no cover - compiled
    """numpy's float32 -> float16 cast, bit for bit, as codecs._enc_fp16 does it: |x| + C - C
    with C = 2^(exponent + 13) rounds |x| to the fp16 ulp (RNE), times 2^-112 rebiases; ``adopt``
    also writes the decoded value back into x."""
    for i in range(xbits.size):
        b = xbits[i]
        a = np.uint32(b & np.uint32(0x7FFFFFFF))
        c = np.uint32(min(max(a & np.uint32(0x7F800000), np.uint32(113 << 23)), np.uint32(0x7F000000))
                      + np.uint32(13 << 23))
        cf = c.view(np.float32)
        r = np.float32(np.float32(np.float32(a.view(np.float32) + cf) - cf) * np.float32(2.0 ** -112))
        h = np.uint32((r.view(np.uint32) >> np.uint32(13)) | ((b >> np.uint32(16)) & np.uint32(0x8000)))
        u16[i] = np.uint16(h)
        if adopt:
            x[i] = _fp16_value(h)


@numba.njit(**_JIT)
def dec_fp16(u16, dst, add):  # pragma: no cover - compiled
    for i in range(dst.size):
        v = _fp16_value(np.uint32(u16[i]))
        dst[i] = dst[i] + v if add else v


# ---------------------------------------------------------------- non-temporal copy (x86-64)

_V32 = ir.VectorType(ir.IntType(64), 4)  # 32 bytes: one AVX register


@intrinsic
def _copy32_nt(typingctx, dst_t, src_t):  # pragma: no cover - compiled
    """Copy 32 bytes from address ``src`` (any alignment) to address ``dst`` (32-byte aligned)
    with a non-temporal store: the line goes to memory without being read first or kept in the
    cache (``vmovntdq`` on x86-64)."""
    sig = types.void(types.uintp, types.uintp)

    def codegen(context, builder, signature, args):
        dst, src = args
        v = builder.load(builder.inttoptr(src, _V32.as_pointer()), align=1)
        st = builder.store(v, builder.inttoptr(dst, _V32.as_pointer()), align=32)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _sfence(typingctx):  # pragma: no cover - compiled
    """Order the non-temporal stores before every later store (x86 ``sfence``): a thread that
    sees what the caller publishes next sees the copy too."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        mod = builder.module
        fn = mod.globals.get("llvm.x86.sse.sfence") or ir.Function(mod, ir.FunctionType(ir.VoidType(), []),
                                                                     "llvm.x86.sse.sfence")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


if platform.machine().lower() in ("x86_64", "amd64"):
    @numba.njit(**_JIT)
    def copy_nt(dst, src):  # pragma: no cover - compiled
        """dst[:] = src for 1-D C-contiguous uint8 arrays of one size, with non-temporal stores:
        for data written once and (almost) never read, such as a backup, the copy neither reads
        the destination lines first nor evicts the cache lines other threads are working on."""
        n = dst.size
        d, s = dst.ctypes.data, src.ctypes.data
        i = 0
        while i < n and (d + i) % 32 != 0:
            dst[i] = src[i]
            i += 1
        while i + 32 <= n:
            _copy32_nt(d + i, s + i)
            i += 32
        while i < n:
            dst[i] = src[i]
            i += 1
        _sfence()
else:  # no such store to ask for: the backup uses numpy's copy
    copy_nt = None


def warm_up() -> None:
    """Compile (or load from the cache) every specialization ``codecs`` calls, so that no lane
    thread ever compiles: writable and read-only payloads, int8 and uint8 codes, add/adopt or not."""
    u8, i8 = np.zeros(300, np.uint8), np.zeros(300, np.int8)
    scales, packed, y, nib = np.zeros(3, np.float32), np.zeros(150, np.uint8), np.zeros(128, np.float32), \
        np.zeros(129, np.uint8)
    table = np.zeros(16, np.float32)
    x = np.linspace(-1.0, 1.0, 300, dtype=np.float32)  # (codecs encodes read-only input with numpy)
    for adopt in (False, True):
        enc_affine(x, u8, 3, 0.01, 0.0, 0, 255, adopt)
        enc_affine(x, i8, 0, 0.01, 0.0, -127, 127, adopt)
        enc_fp4(x, x.view(np.uint32), scales, scales.view(np.uint32), packed, y, y.view(np.uint32), nib, table,
                adopt)
    for xs in (x, np.frombuffer(bytes(1200), np.float32)):
        minmax_keys(xs.view(np.int32))
    h16 = np.zeros(300, np.uint16)
    for adopt in (False, True):
        enc_bf16(x.view(np.uint32), h16, adopt)
        enc_fp16(x, x.view(np.uint32), h16, adopt)
    dst = np.zeros(300, np.float32)
    for ro in (False, True):
        a, b, c, s = (np.frombuffer(v.tobytes(), v.dtype) if ro else v for v in (u8, i8, packed, scales))
        h = np.frombuffer(h16.tobytes(), np.uint16) if ro else h16
        for add in (False, True):
            dec_bf16(h, dst, add)
            dec_fp16(h, dst, add)
            dec_affine(a, 3, 0.01, 0.0, dst, add)
            dec_affine(b, 0, 0.01, 0.0, dst, add)
            dec_fp4(s, c, table, dst, add)
    if copy_nt is not None:
        copy_nt(u8, u8[::-1].copy())


if __name__ == "__main__":  # `python -m pccl.algorithms.codec_jit`: fill the cache (make does)
    warm_up()

"""Quantization codecs for the quantized ring all-reduce (pure numpy, ALGORITHMS.md §2.5 and §5).

How it works
1. ``encode`` turns a float32 chunk into one contiguous, self-describing byte string: a 20-byte
   header (below) followed by the payload. One blockwise min/max scan (FP4: the block maxima) finds
   the range and also catches NaN/inf, which propagate into it, so finite input costs no extra
   pass; non-finite input raises :class:`InvalidUsage` naming the first bad index.
2. The codec turns each value into a small code (below). Encoding is deterministic numpy float32
   arithmetic, but only the *decode* has to agree across peers: the ring forwards the owner's bytes.
3. ``decode`` parses the header, checks it against what the caller expects (codec, element count,
   exact byte length, finite parameters that cannot overflow float32) and raises
   :class:`ProtocolError` for any defect before writing anything; these bytes come from the network.
4. Decoding runs in cache-sized blocks of integer/bit operations and a fixed sequence of float32
   ops (exact int->float conversion, one multiply, at most one subtract and one add); no libm call
   and no fused multiply-add, so every platform with IEEE subnormals (no FTZ/DAZ, numpy's default)
   gets the same bits. ``decode_add`` decodes a block into a scratch buffer and adds it into the
   accumulator: exactly ``acc + decode(buf)``, without a full-size temporary.
5. In the ring (§5.2) reduce-scatter hops send ``encode(partial sum)``; the receiver calls
   ``decode_add``. The chunk owner adopts ``roundtrip(sum)`` (= decode(encode(sum))) and the
   all-gather forwards the encoded bytes verbatim, so every peer ends with identical bits.

Codecs (``pccl.enums.Quantization``)
* NONE: raw float32 (no finiteness check).
* FP16: round to nearest even, bit-identical to numpy's cast but vectorised (numpy's is scalar);
  values that would round to inf (|x| >= 65520) raise :class:`InvalidUsage` (scale or use BF16).
* BF16: round to nearest even on the float32 bits in integer arithmetic, stored as uint16; values
  that would round to inf (|x| >= ~3.39e38) raise :class:`InvalidUsage`.
* UINT8, affine with zero point (§5.1): s = (hi - lo)/255. When lo <= 0 <= hi, zp = round(-lo/s),
  q = clamp(round(x/s) + zp, 0, 255) and x' = (q - zp)*s, so 0.0 decodes to exactly 0.0. The spec's
  clamped zero point cannot cover a one-signed range, so then zp = 0, offset = lo,
  q = clamp(round((x - lo)/s), 0, 255) and x' = q*s + lo. A constant chunk has s = 0 and decodes to
  exactly lo. Error <= s/2 plus float32 rounding of the decoded value (about 2^-24 |x'|).
* INT8, symmetric: s = max|x|/127, q = clamp(round(x/s), -127, 127), x' = q*s.
* FP4, block-scaled E3M0 (§2.5): blocks of 128 values, s_b = max|x| of the block,
  y = |x|/s_b, k = 0 if y < 2^-7 else clamp(e, -6, 0) + 7 with e the exponent of y rounded to the
  nearest power of two in the linear domain (done on the float32 bits), nibble = sign<<3 | k (the
  sign is kept only when k > 0), x' = +-s_b * 2^(k-7). Two nibbles a byte, first element in the high
  nibble; for odd n the last low nibble is 0. Nibble 0x8 is never written and reads as 0.

Speed: every codec but NONE has compiled twins in :mod:`algorithms.codec_jit` (numba), bit-identical
to the numpy code here, which stays the reference and the fallback. They load in a background
thread the first time a process codes a chunk of >= ``JIT_AFTER`` values (importing numba takes
seconds); until then, and where numba is missing or ``PCCL_CODEC_JIT=0``, the numpy code runs.
Because both give the same bits, peers may mix them, even within one operation.

Wire format, little-endian (integers and IEEE float32)::

    offset size field
    0      1    wire version (1)
    1      1    codec id: NONE 0, FP16 1, BF16 2, UINT8 3, INT8 4, FP4 5
    2      1    zero point zp (UINT8; else 0)
    3      1    reserved, 0
    4      8    n, element count (u64)
    12     4    scale s (UINT8, INT8; else 0), float32
    16     4    offset (UINT8 one-signed or constant chunk: lo; else 0), float32
    20     ..   payload: NONE n float32 | FP16 n float16 | BF16 n uint16 | UINT8 n uint8 |
                INT8 n int8 | FP4 ceil(n/128) float32 block scales, then ceil(n/2) packed bytes
A decoder rejects (ProtocolError) anything else: other version/codec/n/length, non-zero unused
fields, non-finite or overflowing parameters or FP4 scales, NaN/inf FP16/BF16 payload values, a
non-zero FP4 padding nibble.
"""
from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from pccl.enums import Quantization as Q
from pccl.errors import InvalidUsage, ProtocolError

WIRE_VERSION = 1
HEADER = struct.Struct("<BBBBQff")
HEADER_SIZE = HEADER.size  # 20 bytes
FP4_BLOCK = 128
CODEC_IDS: dict[Q, int] = {Q.NONE: 0, Q.FP16: 1, Q.BF16: 2, Q.UINT8: 3, Q.INT8: 4, Q.FP4: 5}

_BLOCK = 1 << 16  # elements per processing block: 256 KiB of float32 stays in L2; multiple of 128
_WIDTH = {Q.NONE: 4, Q.FP16: 2, Q.BF16: 2, Q.UINT8: 1, Q.INT8: 1}
_LE_F32, _LE_U16 = np.dtype("<f4"), np.dtype("<u2")
_F32_MAX = float(np.finfo(np.float32).max)
_TINY = float(np.finfo(np.float32).smallest_subnormal)
_FP16_INF_AT = 65520.0  # smallest magnitude that rounds to inf in float16
_BF16_INF_AT = float(np.array(0x7F7F8000, np.uint32).view(np.float32))
_Y_MIN_BITS = 120 << 23  # float32 bits of 2^-7: smaller y flush to code 0


_MAGS = [2.0**k for k in range(-6, 1)]  # nibble -> +-2^(k-7); 0x8 (never written) reads as 0
_FP4_NIBBLE = np.array([0.0, *_MAGS, 0.0, *(-m for m in _MAGS)], np.float32)
# packed byte -> its (high nibble, low nibble) multipliers as one uint64, for a single np.take
_FP4_PAIRS = np.stack([_FP4_NIBBLE[np.arange(256) >> 4], _FP4_NIBBLE[np.arange(256) & 15]],
                      axis=1).view(np.uint64)[:, 0].copy()
_FP4_PAIRS.setflags(write=False)


Buffer = bytes | bytearray | memoryview | np.ndarray

#: chunks of at least this many values start loading the compiled kernels (smaller ones never pay)
JIT_AFTER = 1 << 18
_JIT_CODECS = frozenset({Q.UINT8, Q.INT8, Q.FP4, Q.FP16, Q.BF16})


class _Kernels:
    """The compiled kernels, loaded once per process by a background thread (see module doc)."""

    def __init__(self) -> None:
        self.module = None  # algorithms.codec_jit once loaded and warmed up
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._started = False

    def get(self, n: int):
        """The kernel module once loaded (then for chunks of any size), else None; a chunk of
        >= JIT_AFTER values starts the loader."""
        if self.module is None and n >= JIT_AFTER:
            self.start()
        return self.module

    def start(self) -> None:
        """Start the loader once per process (a daemon thread that ends by itself)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            if os.environ.get("PCCL_CODEC_JIT", "1") == "0":
                self.error = ImportError("PCCL_CODEC_JIT=0")
                self._done.set()
                return
            threading.Thread(target=self._load, name="pccl-codec-jit", daemon=True).start()

    def _load(self) -> None:
        try:
            from pccl.algorithms import codec_jit

            codec_jit.warm_up()  # compile or load every specialization before any lane uses one
            self.module = codec_jit
        except Exception as exc:  # numba missing or broken: the numpy reference keeps working
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        """Start loading if needed and wait up to ``timeout`` s; True when the kernels are in use."""
        self.start()
        self._done.wait(timeout)
        return self.module is not None


KERNELS = _Kernels()


def _after_fork_in_child() -> None:
    """A child forked while the loader ran has no loader thread, maybe a held lock, and numba
    half-imported in sys.modules (a retry fails on it): it keeps the numpy codecs, says why, and
    never waits for a loader that does not exist."""
    if KERNELS.module is None and KERNELS._started and not KERNELS._done.is_set():
        KERNELS._lock = threading.Lock()
        KERNELS.error = RuntimeError("forked while the codec kernels were loading: numpy codecs here")
        KERNELS._done.set()


os.register_at_fork(after_in_child=_after_fork_in_child)


def load_kernels(timeout: float = 300.0) -> bool:
    """Load the compiled codec kernels now (benchmarks call this before timing). Returns whether
    they are in use; False when numba is unavailable, disabled, or still loading at ``timeout``."""
    return KERNELS.wait(timeout)


class _Parsed(NamedTuple):
    codec: Q
    n: int
    zp: int
    scale: float
    offset: float
    payload: np.ndarray  # uint8, validated


def _codec(codec: Q | str) -> Q:
    try:
        return Q(codec)
    except ValueError:
        raise InvalidUsage(f"unknown quantization codec {codec!r}") from None


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    for i in range(0, n, _BLOCK):
        yield i, min(i + _BLOCK, n)


def _f32_vector(x: object, what: str, writable: bool = False) -> np.ndarray:
    if (not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1
            or writable and not (x.flags.c_contiguous and x.flags.writeable)):
        raise InvalidUsage(f"{what} must be a 1-D float32 numpy array" +
                           (", writable and contiguous" if writable else ""))
    return x


def encoded_size(codec: Q | str, n: int) -> int:
    """Exact bytes of an encoded chunk of ``n`` values. Raises InvalidUsage for n < 0."""
    codec = _codec(codec)
    if n < 0:
        raise InvalidUsage(f"element count must be >= 0, got {n}")
    if codec is Q.FP4:
        return HEADER_SIZE + 4 * (-(-n // FP4_BLOCK)) + (n + 1) // 2
    return HEADER_SIZE + _WIDTH[codec] * n


def _minmax(x: np.ndarray) -> tuple[float, float]:
    """(min, max) in one cached pass; NaN if any NaN, +-inf if any inf; (0, 0) when empty. An
    all-zero chunk gives -0.0 when every zero is -0.0, else +0.0 (numpy leaves the sign of a zero
    bound to the order of the data; this rule makes the compiled scan and numpy's agree)."""
    if x.size == 0:
        return 0.0, 0.0
    jit = KERNELS.get(x.size)
    if jit is not None:
        keys = np.array(jit.minmax_keys(x.view(np.int32)), np.int32)
        if keys[1] > 0x7F800000 or keys[0] < -0x7F800001:  # a NaN's key lies beyond +-inf's
            return float("nan"), float("nan")
        keys ^= (keys >> 31) & 0x7FFFFFFF  # the key map is its own inverse: back to float bits
        lo, hi = (float(v) for v in keys.view(np.float32))
    else:
        lo, hi = _minmax_numpy(x)
    if lo == 0.0 and hi == 0.0:
        lo = hi = -0.0 if bool(np.signbit(x).all()) else 0.0
    return lo, hi


def first_nonfinite(x: np.ndarray) -> int | None:
    """Index of the first NaN/inf of a 1-D float32 array, None when there is none: one min/max
    scan (compiled when loaded); the index is searched only when the scan finds something."""
    x = np.ascontiguousarray(_f32_vector(x, "input"))
    lo, hi = _minmax(x)
    return None if np.isfinite(lo) and np.isfinite(hi) else _nonfinite_index(x)


def _nonfinite_index(x: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(x))[0])


def _minmax_numpy(x: np.ndarray) -> tuple[float, float]:
    nb = -(-x.size // _BLOCK)
    mins, maxs = np.empty(nb, np.float32), np.empty(nb, np.float32)
    for b, (i, j) in enumerate(_blocks(x.size)):
        mins[b], maxs[b] = x[i:j].min(), x[i:j].max()
    return float(mins.min()), float(maxs.max())


def _param_error(codec: Q, zp: int, s: float, off: float) -> str | None:
    """Why header parameters are unusable (None when fine); decoded values can never overflow."""
    if codec is Q.UINT8:
        if not (0.0 <= s <= _F32_MAX and abs(off) <= _F32_MAX):
            return f"uint8 scale {s} / offset {off} not finite and non-negative"
        if s == 0.0 and zp:
            return "uint8 constant chunk with a non-zero zero point"
        if max(zp, 255 - zp) * s + abs(off) > _F32_MAX:
            return "uint8 parameters overflow float32"
    elif codec is Q.INT8:
        if zp or off:
            return "int8 header carries a zero point or offset"
        if not 0.0 <= s <= _F32_MAX / 128:
            return f"int8 scale {s} not finite, negative or overflowing"
    elif zp or s or off:
        return f"{codec.value} header carries parameters"
    return None


def _affine_params(codec: Q, lo: float, hi: float) -> tuple[int, float, float]:
    """(zp, s, offset) of UINT8/INT8 for a finite chunk with range [lo, hi]."""
    if codec is Q.INT8:
        amax = max(-lo, hi)
        return 0, (max(float(np.float32(amax / 127)), _TINY) if amax else 0.0), 0.0
    if hi == lo:
        return 0, 0.0, lo
    s = max(float(np.float32((hi - lo) / 255)), _TINY)
    if lo <= 0.0 <= hi:
        return int(min(max(round(-lo / s), 0), 255)), s, 0.0
    return 0, s, lo


def _enc_affine(x: np.ndarray, q: np.ndarray, zp: int, s: float, off: float, qmin: int,
                qmax: int) -> None:
    tmp = np.empty(min(x.size, _BLOCK), np.float32)
    s32, off32, zp32 = np.float32(s), np.float32(off), np.float32(zp)
    for i, j in _blocks(x.size):
        t = tmp[: j - i]
        if off:
            np.subtract(x[i:j], off32, out=t)
            np.divide(t, s32, out=t)
        else:
            np.divide(x[i:j], s32, out=t)
        np.rint(t, out=t)  # round half to even
        if zp:
            np.add(t, zp32, out=t)
        np.clip(t, qmin, qmax, out=t)
        np.copyto(q[i:j], t, casting="unsafe")


def _enc_bf16(x: np.ndarray, u16: np.ndarray) -> None:
    bits = x.view(np.uint32)
    tmp = np.empty(min(x.size, _BLOCK), np.uint32)
    for i, j in _blocks(x.size):
        b, t = bits[i:j], tmp[: j - i]
        np.right_shift(b, 16, out=t)
        np.bitwise_and(t, 1, out=t)  # lsb of the kept half: ties go to even
        t += 0x7FFF
        t += b
        t >>= 16
        np.copyto(u16[i:j], t, casting="unsafe")


def _enc_fp16(x: np.ndarray, u16: np.ndarray) -> None:
    """numpy's cast, bit for bit, but vectorised: the hardware add rounds |x| to 11 bits (RNE)."""
    bits, tmp = x.view(np.uint32), np.empty((3, min(x.size, _BLOCK)), np.uint32)
    for i, j in _blocks(x.size):
        b, a, c, sg = bits[i:j], tmp[0, : j - i], tmp[1, : j - i], tmp[2, : j - i]
        np.bitwise_and(b, 0x7FFFFFFF, out=a)
        np.bitwise_and(a, 0x7F800000, out=c)
        np.clip(c, 113 << 23, 0x7F000000, out=c)  # the fp16 subnormal range rounds like 2^-14
        c += 13 << 23  # C = 2^(exponent + 13): ulp(C) is the fp16 ulp of |x|
        af, cf = a.view(np.float32), c.view(np.float32)
        np.add(af, cf, out=af)  # the one rounding: RNE to a multiple of ulp(C)
        np.subtract(af, cf, out=af)  # exact
        np.multiply(af, np.float32(2.0**-112), out=af)  # exact: rebias to fp16's exponent
        a >>= 13
        np.right_shift(b, 16, out=sg)
        sg &= 0x8000
        a |= sg
        np.copyto(u16[i:j], a, casting="unsafe")


def _enc_fp4(x: np.ndarray, scales: np.ndarray, packed: np.ndarray) -> None:
    m0 = min(x.size, _BLOCK)
    a, sbu, keep = np.empty(m0, np.uint32), np.empty(m0 // 128 + 1, np.uint32), np.empty(m0, np.bool_)
    k8, s8, t16 = np.empty(m0 + 1, np.uint8), np.empty(m0, np.uint8), np.empty(m0 // 2 + 1, np.uint16)
    xbits = x.view(np.uint32)
    for i, j in _blocks(x.size):
        m, ab, k, sg = j - i, a[: j - i], k8[: j - i], s8[: j - i]
        full, nb = m // FP4_BLOCK, -(-m // FP4_BLOCK)
        head = full * FP4_BLOCK
        np.bitwise_and(xbits[i:j], 0x7FFFFFFF, out=ab)  # |x| bits: same order as |x|
        np.max(ab[:head].reshape(full, FP4_BLOCK), axis=1, out=sbu[:full])
        if nb > full:
            sbu[full] = ab[head:].max()
        if sbu[:nb].max() >= 0x7F800000:
            _raise_nonfinite(x)
        sb = sbu[:nb].view(np.float32)
        scales[i // FP4_BLOCK : i // FP4_BLOCK + nb] = sb
        div = np.where(sb > 0, sb, np.float32(1))  # all-zero block: y = 0 -> code 0
        y = ab.view(np.float32)
        np.divide(y[:head].reshape(full, FP4_BLOCK), div[:full, None],
                  out=y[:head].reshape(full, FP4_BLOCK))
        np.divide(y[head:], div[full:].repeat(m - head), out=y[head:])
        np.greater_equal(ab, _Y_MIN_BITS, out=keep[:m])  # y >= 2^-7
        ab += 1 << 22  # y in [0, 1]; a mantissa >= 1.5 carries: exponent of the nearest 2^e
        np.right_shift(ab, 23, out=k)
        np.clip(k, 121, 127, out=k)  # biased e clamped to [-6, 0]
        k -= 120  # 1..7
        np.right_shift(xbits[i:j], 28, out=sg)
        sg &= 8
        k |= sg
        k *= keep[:m]  # y < 2^-7 -> nibble 0, sign dropped too
        k8[m] = 0  # pad nibble for odd n
        mm = (m + 1) // 2
        v, t = k8[: 2 * mm].view(_LE_U16), t16[:mm]  # v = first | second << 8
        np.left_shift(v, 4, out=t)
        np.right_shift(v, 8, out=v)
        t |= v  # low byte: first << 4 | second
        np.copyto(packed[i // 2 : i // 2 + mm], t, casting="unsafe")


def _raise_nonfinite(x: np.ndarray) -> None:
    i = _nonfinite_index(x)
    raise InvalidUsage(f"quantized all-reduce input contains NaN/inf at index {i} (value {x[i]}); "
                       "fix the input or use Quantization.NONE")


def encode(codec: Q | str, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Encode a 1-D float32 chunk; returns the uint8 bytes (a view of ``out`` when given).

    Raises InvalidUsage: x not a 1-D float32 array, ``out`` not a contiguous uint8 array of at
    least ``encoded_size`` bytes, NaN/inf in x (all codecs but NONE), or values too large for the
    codec (FP16 |x| >= 65520, BF16 |x| >= ~3.39e38, UINT8/INT8 |x| within ~1 % of float32 max).
    """
    return _encode(_codec(codec), np.ascontiguousarray(_f32_vector(x, "encode input")), out, False)[0]


def adopt(codec: Q | str, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The chunk owner's step: encode ``x`` (into ``out`` when given) and overwrite ``x`` with
    decode of those bytes; returns the bytes. Same result as ``encode`` then ``decode(out=x)``, in
    one fused pass where the compiled kernels run. ``x`` must be a writable contiguous 1-D float32
    array; raises like ``encode`` (x is then unspecified: FP4 finds NaN/inf block by block)."""
    codec = _codec(codec)
    x = _f32_vector(x, "adopt input", writable=True)
    buf, done = _encode(codec, x, out, True)
    if not done:
        decode(codec, buf, out=x)
    return buf


def _encode(codec: Q, x: np.ndarray, out: np.ndarray | None, adopt: bool) -> tuple[np.ndarray, bool]:
    """encode(); with ``adopt``, a compiled kernel may also write the decoded values into x:
    returns (bytes, whether it did)."""
    n = x.size
    done = False
    size = encoded_size(codec, n)
    if out is None:
        buf = np.empty(size, np.uint8)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1
          or not out.flags.c_contiguous or not out.flags.writeable or out.size < size):
        raise InvalidUsage(f"out must be a writable contiguous uint8 array of >= {size} bytes")
    else:
        buf = out[:size]
    payload = buf[HEADER_SIZE:]
    zp, s, off = 0, 0.0, 0.0
    if codec is Q.NONE:
        payload.view(_LE_F32)[:] = x
    else:
        lo, hi = _minmax(x) if codec is not Q.FP4 else (0.0, 0.0)  # FP4 checks block scales
        if not (np.isfinite(lo) and np.isfinite(hi)):
            _raise_nonfinite(x)
        limit = {Q.FP16: _FP16_INF_AT, Q.BF16: _BF16_INF_AT}.get(codec)
        if limit is not None and max(-lo, hi) >= limit:
            i = int(np.flatnonzero(np.abs(x) >= limit)[0])
            raise InvalidUsage(f"value {x[i]} at index {i} overflows {codec.value} (|x| must be "
                               f"< {limit:.6g}); scale the input or use another codec")
        jit = KERNELS.get(n) if x.flags.writeable else None  # compiled for writable x only
        if codec is Q.FP16 and jit is not None:
            jit.enc_fp16(x, x.view(np.uint32), payload.view(_LE_U16), adopt)
            done = adopt
        elif codec is Q.BF16 and jit is not None:
            jit.enc_bf16(x.view(np.uint32), payload.view(_LE_U16), adopt)
            done = adopt
        elif codec is Q.FP16:
            _enc_fp16(x, payload.view(_LE_U16))
        elif codec is Q.BF16:
            _enc_bf16(x, payload.view(_LE_U16))
        elif codec is Q.FP4:
            nb = -(-n // FP4_BLOCK)
            scales, packed = payload[: 4 * nb].view(_LE_F32), payload[4 * nb :]
            if jit is None:
                _enc_fp4(x, scales, packed)
            else:
                y, nib = np.empty(FP4_BLOCK, np.float32), np.empty(FP4_BLOCK + 1, np.uint8)
                if not jit.enc_fp4(x, x.view(np.uint32), scales, scales.view(np.uint32), packed, y,
                                   y.view(np.uint32), nib, _FP4_NIBBLE, adopt):
                    _raise_nonfinite(x)
                done = adopt
        else:
            zp, s, off = _affine_params(codec, lo, hi)
            if _param_error(codec, zp, s, off):
                raise InvalidUsage(f"values too close to the float32 limit for {codec.value} "
                                   f"quantization (range [{lo}, {hi}])")
            if s == 0.0:  # all zero (INT8) or constant (UINT8: decodes to the offset)
                payload[:] = 0
            elif jit is not None:
                q = payload.view(np.int8) if codec is Q.INT8 else payload
                jit.enc_affine(x, q, zp, s, off, *((-127, 127) if codec is Q.INT8 else (0, 255)), adopt)
                done = adopt
            elif codec is Q.INT8:
                _enc_affine(x, payload.view(np.int8), 0, s, 0.0, -127, 127)
            else:
                _enc_affine(x, payload, zp, s, off, 0, 255)
    HEADER.pack_into(buf, 0, WIRE_VERSION, CODEC_IDS[codec], zp, 0, n, s, off)
    return buf, done


def _parse(codec: Q, buf: Buffer, expected_n: int | None) -> _Parsed:
    try:
        raw = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    except (TypeError, ValueError) as exc:
        raise InvalidUsage("encoded chunk must be a bytes-like object") from exc
    if raw.dtype != np.uint8 or raw.ndim != 1 or not raw.flags.c_contiguous:
        raise InvalidUsage("encoded chunk must be bytes or a contiguous 1-D uint8 array")
    if raw.size < HEADER_SIZE:
        raise ProtocolError(f"encoded chunk of {raw.size} bytes is shorter than its header")
    version, cid, zp, reserved, n, s, off = HEADER.unpack_from(raw)
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported codec wire version {version} (this build: {WIRE_VERSION})")
    if cid != CODEC_IDS[codec]:
        raise ProtocolError(f"encoded chunk has codec id {cid}, expected {CODEC_IDS[codec]} "
                            f"({codec.value})")
    if reserved:
        raise ProtocolError("reserved header byte is not zero")
    if expected_n is not None and n != expected_n:
        raise ProtocolError(f"encoded chunk holds {n} values, expected {expected_n}")
    if raw.size != encoded_size(codec, n):
        raise ProtocolError(f"encoded {codec.value} chunk of {n} values must be "
                            f"{encoded_size(codec, n)} bytes, got {raw.size}")
    why = _param_error(codec, zp, s, off)
    if why:
        raise ProtocolError(why)
    payload = raw[HEADER_SIZE:]
    if codec is Q.FP4 and n:
        scales = payload[: 4 * -(-n // FP4_BLOCK)].view(_LE_F32)
        if not np.all((scales >= 0) & (scales <= _F32_MAX)):
            raise ProtocolError("fp4 block scale not finite and non-negative")
        if n % 2 and payload[-1] & 0x0F:
            raise ProtocolError("fp4 padding nibble is not zero")
    elif codec in (Q.FP16, Q.BF16) and n:
        exp = 0x7C00 if codec is Q.FP16 else 0x7F80
        u16, tmp = payload.view(_LE_U16), np.empty(min(n, _BLOCK), np.uint16)
        for i, j in _blocks(n):
            t = np.bitwise_and(u16[i:j], exp, out=tmp[: j - i])
            if t.max() == exp:
                raise ProtocolError(f"{codec.value} payload holds NaN/inf near index {i}")
    return _Parsed(codec, n, zp, s, off, payload)


def _decode_block(p: _Parsed, i: int, j: int, dst: np.ndarray, scratch: np.ndarray) -> None:
    """Write the decoded values [i, j) into dst (float32, length j - i)."""
    c, pay = p.codec, p.payload
    if c is Q.NONE:
        np.copyto(dst, pay.view(_LE_F32)[i:j])
    elif c is Q.FP16:  # magnitude bits placed as a float32 then scaled by 2^112: exact
        d = dst.view(np.uint32)
        np.copyto(d, pay.view(_LE_U16)[i:j])
        sg = np.bitwise_and(d, 0x8000, out=scratch.view(np.uint32)[: j - i])
        sg <<= 16
        d &= 0x7FFF
        d <<= 13
        np.multiply(dst, np.float32(2.0**112), out=dst)
        d |= sg
    elif c is Q.BF16:
        np.left_shift(pay.view(_LE_U16)[i:j], 16, out=dst.view(np.uint32), dtype=np.uint32)
    elif c is Q.INT8:
        np.multiply(pay.view(np.int8)[i:j], np.float32(p.scale), out=dst)
    elif c is Q.UINT8:
        if p.scale == 0.0:
            dst.fill(p.offset)  # constant chunk: exactly lo
            return
        if p.zp:
            np.subtract(pay[i:j], np.float32(p.zp), out=dst)  # exact: small integers
            np.multiply(dst, np.float32(p.scale), out=dst)
        else:
            np.multiply(pay[i:j], np.float32(p.scale), out=dst)
        if p.offset:
            np.add(dst, np.float32(p.offset), out=dst)
    else:
        m, nb = j - i, -(-p.n // FP4_BLOCK)
        scales = pay[: 4 * nb].view(_LE_F32)[i // FP4_BLOCK : -(-j // FP4_BLOCK)]
        packed = pay[4 * nb + i // 2 : 4 * nb + (j + 1) // 2]
        pairs = scratch[: packed.size]
        np.take(_FP4_PAIRS, packed, out=pairs, mode="wrap")  # uint8 index: in range
        vals, full = pairs.view(np.float32), m // FP4_BLOCK
        head = full * FP4_BLOCK
        np.multiply(vals[:head].reshape(full, FP4_BLOCK), scales[:full, None],
                    out=dst[:head].reshape(full, FP4_BLOCK))  # power of two: exact
        if m > head:
            np.multiply(vals[head:m], scales[full], out=dst[head:])


def _decode_jit(p: _Parsed, dst: np.ndarray, add: bool) -> bool:
    """Decode (add=False) or decode-accumulate all of ``p`` into ``dst`` with the compiled kernels;
    False when they are not in use for this chunk (the caller then runs the numpy reference)."""
    if p.codec not in _JIT_CODECS or (p.codec is Q.UINT8 and p.scale == 0.0):
        return False
    jit = KERNELS.get(p.n)
    if jit is None:
        return False
    pay = p.payload
    if p.codec in (Q.UINT8, Q.INT8):
        jit.dec_affine(pay.view(np.int8) if p.codec is Q.INT8 else pay, p.zp, p.scale, p.offset, dst, add)
    elif p.codec in (Q.FP16, Q.BF16):
        (jit.dec_fp16 if p.codec is Q.FP16 else jit.dec_bf16)(pay.view(_LE_U16), dst, add)
    else:
        nb = -(-p.n // FP4_BLOCK)
        jit.dec_fp4(pay[: 4 * nb].view(_LE_F32), pay[4 * nb :], _FP4_NIBBLE, dst, add)
    return True


def decode(codec: Q | str, buf: Buffer, out: np.ndarray | None = None,
           n: int | None = None) -> np.ndarray:
    """Decode one encoded chunk into float32 (into ``out`` when given, else a new array).

    The header must match ``codec``, hold ``n`` values (or ``out.size`` when ``out`` is given) and
    the buffer must be exactly ``encoded_size`` bytes. Raises ProtocolError for any malformed or
    mismatching buffer (nothing is written then), InvalidUsage for a wrong ``out``/``buf`` type or
    when ``n`` and ``out.size`` disagree.
    """
    codec = _codec(codec)
    if out is not None:
        out = _f32_vector(out, "decode out", writable=True)
        if n is not None and n != out.size:
            raise InvalidUsage(f"n={n} disagrees with out.size={out.size}")
        n = out.size
    p = _parse(codec, buf, n)
    if out is None:
        out = np.empty(p.n, np.float32)
    if _decode_jit(p, out, add=False):
        return out
    scratch = np.empty(min(p.n, _BLOCK) // 2 + 1, np.uint64)
    for i, j in _blocks(p.n):
        _decode_block(p, i, j, out[i:j], scratch)
    return out


def decode_add(codec: Q | str, buf: Buffer, acc: np.ndarray) -> None:
    """acc += decode(buf), elementwise in float32, bit-identical to that expression.

    Decodes block by block into a small scratch buffer (no full-size temporary). Raises like
    ``decode`` with n = acc.size; acc is untouched when it raises.
    """
    codec = _codec(codec)
    acc = _f32_vector(acc, "decode_add accumulator", writable=True)
    p = _parse(codec, buf, acc.size)
    if _decode_jit(p, acc, add=True):
        return
    tmp = np.empty(min(p.n, _BLOCK), np.float32)
    scratch = np.empty(min(p.n, _BLOCK) // 2 + 1, np.uint64)
    for i, j in _blocks(p.n):
        t = tmp[: j - i]
        _decode_block(p, i, j, t, scratch)
        np.add(acc[i:j], t, out=acc[i:j])


def roundtrip(codec: Q | str, x: np.ndarray) -> np.ndarray:
    """decode(encode(x)): the value the chunk owner adopts so that it matches every receiver."""
    return decode(codec, encode(codec, x))

"""Codec speed, numpy reference against the compiled kernels: ``codecs.encode`` and
``codecs.decode`` of one 4 MiB float32 piece into preallocated buffers, median of 9, in GB/s of
float32 (docs/benchmarks.md). Run: ``.venv/bin/python tests/measure_codecs.py``."""
from __future__ import annotations

import time

import numpy as np

from pccl.algorithms import codecs as C


def rate(fn, nbytes: int, reps: int = 9) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[reps // 2] / 1e9


def main() -> None:
    if not C.load_kernels():
        raise SystemExit(f"the compiled kernels are not available: {C.KERNELS.error!r}")
    n = 1 << 20
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    for q in (C.Q.FP16, C.Q.BF16, C.Q.UINT8, C.Q.INT8, C.Q.FP4):
        out, dst, enc = np.empty(C.encoded_size(q, n), np.uint8), np.empty(n, np.float32), C.encode(q, x)
        res = {}
        for mode in ("numpy", "compiled"):
            saved = C.KERNELS.module
            if mode == "numpy":
                C.KERNELS.module = None
            try:
                res[mode] = (rate(lambda: C.encode(q, x, out=out), 4 * n), rate(lambda: C.decode(q, enc, out=dst), 4 * n))
            finally:
                C.KERNELS.module = saved
        print(f"{q.value:6s} encode {res['numpy'][0]:.2f} -> {res['compiled'][0]:.2f} GB/s, "
              f"decode {res['numpy'][1]:.2f} -> {res['compiled'][1]:.2f} GB/s")


if __name__ == "__main__":
    main()

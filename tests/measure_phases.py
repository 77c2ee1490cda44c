"""The phases of one all-reduce with every peer in its own process (docs/benchmarks.md):

    .venv/bin/python tests/measure_phases.py --peers 2 --mib 64 --ops 8 --quantization none uint8 fp4

Starts a master and ``--peers`` processes. Each runs 5 warm-up ops and then ``--ops`` in-place AVG
all-reduces of random float32 per quantization mode (the compiled codec kernels loaded first), and
prints its medians (ms) of the phases of ``measure_latency.phases`` (call → announce includes the
finiteness scan of a quantized input; commence → report is the data plane).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import pccl


def peer(address: str, world: int, mib: int, ops: int, modes: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import measure_latency as ml
    from pccl.algorithms import codecs

    ml._wrap()
    if any(m != "none" for m in modes):
        codecs.load_kernels()
    c = pccl.Communicator(address).connect()
    end = time.monotonic() + 120
    while c.world_size < world:
        if time.monotonic() > end:
            raise SystemExit(f"only {c.world_size} of {world} peers joined")
        c.update_topology()
        time.sleep(0.05)
    x = np.random.default_rng(c.rank).standard_normal((mib << 20) // 4).astype(np.float32)
    me, out = id(c), {"rank": c.rank}
    for mode in modes:
        q = pccl.Quantization(mode)
        for _ in range(5):
            c.all_reduce(x, op=pccl.ReduceOp.AVG, quantization=q)
        ml.STAMPS.clear()
        calls = []
        for _ in range(ops):
            t = time.perf_counter()
            c.all_reduce(x, op=pccl.ReduceOp.AVG, quantization=q)
            calls.append((t, time.perf_counter()))
        out[mode] = {k: round(v, 1) for k, v in ml.phases(me, calls, skip=0).items()}
    print(json.dumps(out, ensure_ascii=False), flush=True)
    c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--ops", type=int, default=8)
    p.add_argument("--quantization", nargs="+", default=["none", "uint8", "fp4"])
    p.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.peer:
        peer(a.peer, a.peers, a.mib, a.ops, a.quantization)
        return
    with pccl.Master("127.0.0.1", 0) as m:
        argv = [sys.executable, __file__, "--peer", m.address, "--peers", str(a.peers), "--mib", str(a.mib),
                "--ops", str(a.ops), "--quantization", *a.quantization]
        procs = [subprocess.Popen(argv) for _ in range(a.peers)]
        for proc in procs:
            proc.wait(900)


if __name__ == "__main__":
    main()

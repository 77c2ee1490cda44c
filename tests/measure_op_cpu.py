"""CPU time per all-reduce, per thread, with the peers in their own processes (Linux /proc).

    .venv/bin/python tests/measure_op_cpu.py --peers 2 --elems 256 --ops 300

Starts a master in this process and ``--peers`` peer processes; each peer runs 5 untimed and then
``--ops`` timed all-reduces (in place, or ``--out-of-place``) of ``--elems`` float32 values and
prints the wall time per op and, per thread (named by its Python thread name; "native" is zmq's
I/O thread), the CPU time (user + system, /proc/self/task/*/stat) and the context switches
(/proc/self/task/*/status) per op. The CPU per op of this process's threads (the master's among
them) is printed too.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time

import numpy as np

TICK = os.sysconf("SC_CLK_TCK")


def _threads(task_dir: str) -> dict[str, tuple[int, int]]:
    """Per thread id of the process whose task dir is given: (clock ticks of CPU, user + system;
    context switches, voluntary + involuntary)."""
    out = {}
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            with open(f"{task_dir}/{tid}/status") as fh:
                switches = sum(int(line.split()[1]) for line in fh if "ctxt_switches" in line)
            out[tid] = (int(f[11]) + int(f[12]), switches)
        except OSError:
            pass
    return out


def _per_name(before: dict, after: dict, ops: int) -> tuple[dict[str, float], dict[str, float]]:
    """(CPU ms per op, context switches per op) by thread name, between two :func:`_threads`
    readings of this process; zmq's I/O thread (not a Python thread) is "native", lanes are summed."""
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    cpu: dict[str, float] = {}
    switches: dict[str, float] = {}
    for tid, (ticks, sw) in after.items():
        t0, s0 = before.get(tid, (0, 0))
        name = names.get(tid, "native")
        name = "pccl-lane" if name.startswith("pccl-lane") else name
        cpu[name] = cpu.get(name, 0.0) + (ticks - t0) / TICK / ops * 1e3
        switches[name] = switches.get(name, 0.0) + (sw - s0) / ops
    return cpu, switches


def _top(values: dict[str, float], fmt: str, least: float) -> str:
    return ", ".join(f"{k} {v:{fmt}}" for k, v in sorted(values.items(), key=lambda kv: -kv[1]) if v >= least)


def _peer(address: str, n: int, elems: int, ops: int, out_of_place: bool, results) -> None:
    import pccl
    from pccl.algorithms import codecs

    codecs.load_kernels()  # as in a long job: the backup's non-temporal copy, unless PCCL_CODEC_JIT=0

    c = pccl.Communicator(master=address).connect(timeout=60)
    deadline = time.monotonic() + 60
    while c.world_size < n and time.monotonic() < deadline:
        if c.are_peers_pending():
            c.update_topology(timeout=60)
        else:
            time.sleep(0.05)
    x = np.zeros(elems, np.float32)  # sums stay 0: no overflow over many ops
    y = np.empty_like(x) if out_of_place else None
    for _ in range(5):
        c.all_reduce(x, y)
    rank = c.rank
    before, w0 = _threads("/proc/self/task"), time.monotonic()
    for _ in range(ops):
        c.all_reduce(x, y)
    w1, after = time.monotonic(), _threads("/proc/self/task")
    results.put((rank, (w1 - w0) / ops * 1e3, *_per_name(before, after, ops)))
    c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--elems", type=int, default=256)
    p.add_argument("--ops", type=int, default=300)
    p.add_argument("--out-of-place", action="store_true",
                   help="all_reduce(x, y) into a second buffer: no backup copy of the input")
    a = p.parse_args()
    import pccl

    ctx = mp.get_context("spawn")
    with pccl.Master("127.0.0.1", 0) as master:
        q = ctx.Queue()
        procs = [ctx.Process(target=_peer, args=(master.address, a.peers, a.elems, a.ops, a.out_of_place, q))
                 for _ in range(a.peers)]
        for pr in procs:
            pr.start()
        m0 = _threads(f"/proc/{os.getpid()}/task")
        got = [q.get(timeout=600) for _ in procs]
        mine, _ = _per_name(m0, _threads(f"/proc/{os.getpid()}/task"), a.ops)  # while the master runs
        for pr in procs:
            pr.join(30)
    print(f"{a.peers} peers, {a.elems * 4} B per op, {a.ops} ops, {'out of place' if a.out_of_place else 'in place'}")
    for rank, wall, cpu, switches in sorted(got):
        print(f"rank {rank}: wall {wall:.2f} ms/op, CPU {sum(cpu.values()):.2f} ms/op ({_top(cpu, '.2f', 0.01)}), "
              f"{sum(switches.values()):.1f} context switches/op ({_top(switches, '.1f', 0.1)})")
    print("this process (the master's thread, and the peers' start-up before the timed ops): "
          f"{_top(mine, '.2f', 0.01)} ms/op")


if __name__ == "__main__":
    main()

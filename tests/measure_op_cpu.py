"""CPU time per all-reduce, per thread, with the peers in their own processes (Linux /proc).

    .venv/bin/python tests/measure_op_cpu.py --peers 2 --elems 256 --ops 300

Starts a master in this process and ``--peers`` peer processes; each peer runs 5 untimed and then
``--ops`` timed in-place all-reduces of ``--elems`` float32 values and prints the wall time per
op and, per thread (named by its Python thread name; "native" is zmq's I/O thread), the CPU time
(user + system, /proc/self/task/*/stat) and the context switches (/proc/self/task/*/status) per
op. The CPU per op of this process's threads (the master's among them) is printed too.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time

import numpy as np

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(task_dir: str) -> dict[str, int]:
    """Clock ticks of CPU (user + system) per thread id of the process whose task dir is given."""
    out = {}
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            out[tid] = int(f[11]) + int(f[12])
        except OSError:
            pass
    return out


def _switches(task_dir: str) -> dict[str, int]:
    """Context switches (voluntary + involuntary) per thread id."""
    out = {}
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/status") as fh:
                out[tid] = sum(int(line.split()[1]) for line in fh if "ctxt_switches" in line)
        except OSError:
            pass
    return out


def _peer(address: str, n: int, elems: int, ops: int, results) -> None:
    import pccl

    c = pccl.Communicator(master=address).connect(timeout=60)
    deadline = time.monotonic() + 60
    while c.world_size < n and time.monotonic() < deadline:
        if c.are_peers_pending():
            c.update_topology(timeout=60)
        else:
            time.sleep(0.05)
    x = np.zeros(elems, np.float32)  # sums stay 0: no overflow over many ops
    for _ in range(5):
        c.all_reduce(x)
    rank = c.rank
    s0, c0, w0 = _switches("/proc/self/task"), _cpu("/proc/self/task"), time.monotonic()
    for _ in range(ops):
        c.all_reduce(x)
    c1, w1, s1 = _cpu("/proc/self/task"), time.monotonic(), _switches("/proc/self/task")
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    per = {}
    for tid, ticks in c1.items():
        name = names.get(tid, "native")  # zmq's I/O thread is not a Python thread
        name = "pccl-lane" if name.startswith("pccl-lane") else name
        per[name] = per.get(name, 0.0) + (ticks - c0.get(tid, 0)) / TICK / ops * 1e3
    switches = {}
    for tid, v in s1.items():
        name = names.get(tid, "native")
        name = "pccl-lane" if name.startswith("pccl-lane") else name
        switches[name] = switches.get(name, 0.0) + (v - s0.get(tid, 0)) / ops
    results.put((rank, (w1 - w0) / ops * 1e3, per, switches))
    c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--elems", type=int, default=256)
    p.add_argument("--ops", type=int, default=300)
    a = p.parse_args()
    import pccl

    ctx = mp.get_context("spawn")
    with pccl.Master("127.0.0.1", 0) as master:
        q = ctx.Queue()
        procs = [ctx.Process(target=_peer, args=(master.address, a.peers, a.elems, a.ops, q)) for _ in range(a.peers)]
        for pr in procs:
            pr.start()
        m0 = _cpu(f"/proc/{os.getpid()}/task")
        got = [q.get(timeout=600) for _ in procs]
        m1 = _cpu(f"/proc/{os.getpid()}/task")
        names = {str(t.native_id): t.name for t in threading.enumerate()}
        for pr in procs:
            pr.join(30)
    print(f"{a.peers} peers, {a.elems * 4} B per op, {a.ops} ops")
    for rank, wall, per, switches in sorted(got):
        total = sum(per.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.01)
        print(f"rank {rank}: wall {wall:.2f} ms/op, CPU {total:.2f} ms/op ({parts}), "
              f"{sum(switches.values()):.1f} context switches/op ("
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(switches.items(), key=lambda kv: -kv[1]) if v >= 0.1) + ")")
    mine = {names.get(t, "native"): (m1[t] - m0.get(t, 0)) / TICK / a.ops * 1e3 for t in m1}
    print("this process (the master's thread, and the peers' start-up before the timed ops): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(mine.items(), key=lambda kv: -kv[1]) if v >= 0.01) + " ms/op")


if __name__ == "__main__":
    main()

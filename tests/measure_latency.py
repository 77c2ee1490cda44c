"""Where the time of a small all-reduce goes: two in-process peers and a master, phase by phase.

    .venv/bin/python tests/measure_latency.py --elems 256 1048576 --ops 40

For each size, runs ``--ops`` all-reduces on both peers at once and prints the medians (ms, peer
a's view, the first 5 ops skipped) of: the call until the Announce is handed to the control
thread; Announce until the master's Commence arrives (includes waiting for the other peer's
Announce); Commence until this peer's OpReport (the data plane); OpReport until the Verdict
arrives (includes the other peer's report); Verdict until the call returns; and the whole call.
Timestamps come from wrapping Communicator._send and Communicator._on_message (no library change).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

import pccl
from pccl import communicator as cm

sys.path.insert(0, str(Path(__file__).parent))
from test_communicator_local import pair  # noqa: E402

STAMPS: dict[tuple[int, str], list[float]] = collections.defaultdict(list)


def _wrap() -> None:
    send, on_message = cm.Communicator._send, cm.Communicator._on_message

    def timed_send(self, msg):
        STAMPS[(id(self), type(msg).__name__)].append(time.perf_counter())
        return send(self, msg)

    def timed_on_message(self, msg):
        STAMPS[(id(self), "rx_" + type(msg).__name__)].append(time.perf_counter())
        return on_message(self, msg)

    cm.Communicator._send = timed_send
    cm.Communicator._on_message = timed_on_message


def measure(a, b, elems: int, ops: int) -> dict[str, float]:
    calls: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)

    def run(c) -> None:
        x = np.ones(elems, np.float32)
        for _ in range(ops):
            t = time.perf_counter()
            c.all_reduce(x)
            calls[id(c)].append((t, time.perf_counter()))

    STAMPS.clear()
    threads = [threading.Thread(target=run, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return phases(id(a), calls[id(a)], skip=5)


def phases(me: int, calls: list[tuple[float, float]], skip: int) -> dict[str, float]:
    """Medians (ms) of each phase of communicator ``me``'s calls (start, end), from STAMPS,
    leaving out the first ``skip`` calls."""
    start = [s for s, _ in calls]
    end = [e for _, e in calls]
    ann, com = STAMPS[(me, "Announce")], STAMPS[(me, "rx_Commence")]
    rep, ver = STAMPS[(me, "OpReport")], STAMPS[(me, "rx_Verdict")]
    n = min(map(len, (start, ann, com, rep, ver, end)))

    def med(x: list[float], y: list[float]) -> float:
        return statistics.median((y[i] - x[i]) * 1e3 for i in range(skip, n))

    return {"call→announce": med(start, ann), "announce→commence": med(ann, com), "commence→report": med(com, rep),
            "report→verdict": med(rep, ver), "verdict→return": med(ver, end), "total": med(start, end)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elems", type=int, nargs="+", default=[256, 262144], help="float32 elements per all-reduce")
    p.add_argument("--ops", type=int, default=40)
    args = p.parse_args()
    if args.ops <= 5:
        p.error("--ops must be over 5 (the first 5 are skipped)")
    _wrap()
    master = pccl.Master("127.0.0.1", 0).start()
    a, b = pair(master)
    try:
        for elems in args.elems:
            r = measure(a, b, elems, args.ops)
            print(f"{elems * 4:>9} B  " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()) + "  (ms, medians)")
    finally:
        a.close()
        b.close()
        master.close()


if __name__ == "__main__":
    main()

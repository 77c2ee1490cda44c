"""Measure how fast survivors' all_reduce raises after a peer is SIGKILLed or SIGSTOPped mid-op.

    .venv/bin/python tests/measure_failover.py --runs 5 --peers 4 --count 4194304

Prints the latency from the signal to each survivor's exception, per run, and the median/max.
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cluster import Cluster  # noqa: E402


def one(sig: int, peers: int, count: int, peer_timeout: float) -> list[float]:
    cluster = Cluster(peer_timeout=peer_timeout, heartbeat_interval=min(0.5, peer_timeout / 4))
    try:
        procs = [cluster.spawn("loop", i, "--world", str(peers), "--count", str(count), "--ops", "1000")
                 for i in range(peers)]
        for p in procs:
            p.expect("op_ok", timeout=120, n=2)
        victim = procs[-1]
        victim.expect("op_start", timeout=30)
        time.sleep(0.02)
        t = victim.signal(sig)
        lat = []
        for p in procs[:-1]:
            ev = p.expect("op_fail", timeout=peer_timeout + 30)
            assert ev["restored"], ev
            lat.append(ev["t"] - t)
        return lat
    finally:
        cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--count", type=int, default=4 << 20)
    ap.add_argument("--peer-timeout", type=float, default=2.0)
    args = ap.parse_args()
    for name, sig in (("SIGKILL", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
        all_lat = []
        for r in range(args.runs):
            lat = one(sig, args.peers, args.count, args.peer_timeout)
            all_lat += lat
            print(f"{name} run {r}: " + " ".join(f"{x:.3f}s" for x in lat), flush=True)
        print(f"{name}: {len(all_lat)} survivor calls, median {statistics.median(all_lat):.3f}s, "
              f"max {max(all_lat):.3f}s (peer_timeout {args.peer_timeout}s)", flush=True)


if __name__ == "__main__":
    main()

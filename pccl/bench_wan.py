"""``pccl bench-wan``: all-reduce across emulated hosts (network namespaces behind rate-limited
links): quantized against unquantized, and K striped connections against one under a per-flow cap.

How it works
1. ``pccl.netem`` builds one namespace per peer on a bridge; the master runs in the root
   namespace. ``--rate`` caps each host's link (tbf); ``--per-flow-rate`` caps each TCP flow
   instead (htb classes chosen by source-port bits), like a long-fat WAN path.
2. Every peer process opens one communicator per entry of ``--connections`` (one master each, so
   every configuration is its own world) and, trial after trial, runs the same sequence of
   all-reduces: for each connection count, for each quantization. Configurations are thus
   interleaved in one run; peer 0 reports its wall time per op.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from pccl.errors import PcclError


def _peer(args) -> None:
    import pccl

    masters = args.master.split(",")
    ks = [int(k) for k in args.connections.split(",")]
    comms = [pccl.Communicator(addr, connections=k, advertise_host=args.advertise) for addr, k in zip(masters, ks)]

    def assemble(c) -> None:  # one thread per world: admission needs every world's votes at once
        c.connect(timeout=args.timeout)
        end = time.monotonic() + args.timeout
        while c.world_size < args.peers and time.monotonic() < end:
            if c.are_peers_pending():
                c.update_topology()
            time.sleep(0.05)

    ts = [threading.Thread(target=assemble, args=(c,), daemon=True) for c in comms]
    for t in ts:
        t.start()
    for t in ts:
        t.join(args.timeout)
    if any(c.world_size < args.peers for c in comms):
        raise PcclError(f"worlds {[c.world_size for c in comms]}, expected {args.peers}")
    n = (args.mib << 20) // 4
    data = np.random.default_rng(args.index).standard_normal(n).astype(np.float32)
    buf = np.empty_like(data)
    modes = args.quantization.split(",")
    for c in comms:  # warm-up: links, page faults of the buffers
        np.copyto(buf, data)
        c.all_reduce(buf, op=pccl.ReduceOp.AVG)
    for trial in range(args.repeats):
        for c, k in zip(comms, ks):
            for q in modes:
                np.copyto(buf, data)
                t0 = time.perf_counter()
                info = c.all_reduce(buf, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization(q),
                                    timeout=args.timeout)
                dt = time.perf_counter() - t0
                if args.index == 0:
                    print(json.dumps({"event": "trial", "trial": trial, "connections": k, "quantization": q,
                                      "seconds": dt, "tx": info.tx_bytes}), flush=True)
    for c in comms:
        c.close()


def run(args) -> dict:
    import pccl
    from pccl import netem

    ok, why = netem.available()
    if not ok:
        raise PcclError(f"bench-wan needs network namespaces: {why}")
    netem.down()
    hosts = netem.up(args.peers, rate=args.rate if not args.per_flow_rate else None,
                     per_flow_rate=args.per_flow_rate, flows=args.flows)
    ks = args.connections.split(",")
    masters = [pccl.Master(hosts.address(0), 0).start() for _ in ks]
    procs: list[subprocess.Popen] = []
    trials = []
    try:
        common = ["--master", ",".join(m.address for m in masters), "--peers", str(args.peers), "--mib",
                  str(args.mib), "--connections", args.connections, "--quantization", args.quantization,
                  "--repeats", str(args.repeats), "--timeout", str(args.timeout)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i in range(args.peers):
            argv = [sys.executable, "-m", "pccl.bench_wan", "peer", "--index", str(i),
                    "--advertise", hosts.address(i + 1)] + common
            procs.append(hosts.run(i + 1, argv, stdout=subprocess.PIPE, text=True, env=env))
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            ev = json.loads(line)
            trials.append(ev)
            print(f"  trial {ev['trial']} K={ev['connections']} {ev['quantization']:>5}: {ev['seconds']:.3f} s",
                  flush=True)
        if procs[0].wait(args.timeout) != 0:
            raise PcclError("peer 0 failed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for m in masters:
            m.close()
        hosts.down()
    nbytes = (args.mib << 20) // 4 * 4
    factor = 2 * (args.peers - 1) / args.peers
    cells = {}
    for k in ks:
        for q in args.quantization.split(","):
            ts = [t["seconds"] for t in trials if str(t["connections"]) == k and t["quantization"] == q]
            med = statistics.median(ts)
            cells[f"K={k} {q}"] = {"seconds": ts, "median_s": med, "busbw_GBps": nbytes / med * factor / 1e9}
    summary = {"peers": args.peers, "mib": args.mib, "rate": args.rate, "per_flow_rate": args.per_flow_rate,
               "flows": args.flows, "cells": cells}
    base = cells[f"K={ks[0]} none"]["median_s"] if f"K={ks[0]} none" in cells else None
    for name, c in cells.items():
        speed = f", {base / c['median_s']:.2f}x vs K={ks[0]} none" if base else ""
        print(f"{name:>14}: median {c['median_s']:.3f} s, busbw {c['busbw_GBps'] * 1e3:.1f} MB/s{speed}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pccl bench-wan", description=__doc__.split("\n")[0])
    p.add_argument("role", nargs="?", default="run", choices=["run", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--quantization", default="none,uint8,fp4", help="comma-separated codecs")
    p.add_argument("--connections", default="2", help="comma-separated K values, e.g. 1,4")
    p.add_argument("--rate", default="1gbit", help="per-host link rate (tbf)")
    p.add_argument("--per-flow-rate", default=None, help="cap each TCP flow instead (htb + u32)")
    p.add_argument("--flows", type=int, default=64, help="per-flow classes (source-port residues)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--master", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--advertise", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "peer":
        _peer(args)
        return 0
    summary = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

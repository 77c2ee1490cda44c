"""``pccl bench-wan``: all-reduce across emulated hosts (network namespaces behind rate-limited
links): quantized against unquantized, K striped connections against one under a per-flow cap,
and ring against hierarchical when several peers share a host.

How it works
1. ``pccl.netem`` builds one namespace per host on a bridge; the master runs in the root
   namespace. ``--per-host P`` puts P peers in each namespace (peer i on host 1 + i // P, with
   locality label ``host<h>``); peers of one host reach each other over that namespace's own
   loopback path, unshaped. ``--rate`` caps each host's link (tbf); ``--per-flow-rate`` caps
   each TCP flow instead (htb classes chosen by source-port bits), like a long-fat WAN path.
2. Every peer process opens one communicator per entry of ``--connections`` (one master each, so
   every configuration is its own world). With P > 1 each world then runs ``optimize_topology()``
   (the ring is ordered by measured bandwidth, so it crosses each host boundary once, as a user
   would run it). Trial after trial, every peer runs the same sequence of all-reduces: for each
   connection count, each quantization, each ``--algorithms`` entry. Configurations are thus
   interleaved in one run; peer 0 reports its wall time per op and the algorithm that ran.
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
    host = 1 + args.index // args.per_host
    comms = [pccl.Communicator(addr, connections=k, advertise_host=args.advertise, locality=f"host{host}")
             for addr, k in zip(masters, ks)]

    def assemble(c) -> None:  # one thread per world: admission needs every world's votes at once
        c.connect(timeout=args.timeout)
        end = time.monotonic() + args.timeout
        while c.world_size < args.peers and time.monotonic() < end:
            if c.are_peers_pending():
                c.update_topology()
            time.sleep(0.05)
        if args.per_host > 1 and c.world_size == args.peers:
            c.optimize_topology(timeout=args.timeout)

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
    algos = args.algorithms.split(",")
    if any(q != "none" for q in modes):  # the compiled codec kernels, loaded before any timing
        from pccl.algorithms import codecs

        jit = codecs.load_kernels()
        if args.index == 0:
            print(json.dumps({"event": "codec_kernels", "compiled": jit,
                              "why_not": None if jit else repr(codecs.KERNELS.error)}), flush=True)
    for c in comms:  # warm-up, one op per mode: links, and the pooled buffers each mode keeps
        for q in modes:
            np.copyto(buf, data)
            c.all_reduce(buf, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization(q), timeout=args.timeout)
    for trial in range(args.repeats):
        for c, k in zip(comms, ks):
            for q in modes:
                for a in algos:
                    np.copyto(buf, data)
                    t0 = time.perf_counter()
                    info = c.all_reduce(buf, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization(q),
                                        algorithm=pccl.Algorithm(a), timeout=args.timeout)
                    dt = time.perf_counter() - t0
                    if args.index == 0:
                        print(json.dumps({"event": "trial", "trial": trial, "connections": k, "quantization": q,
                                          "algorithm": a, "ran": info.algorithm, "seconds": dt, "tx": info.tx_bytes,
                                          "ring": list(c.topology)}), flush=True)
    for c in comms:
        c.close()


def run(args) -> dict:
    import pccl
    from pccl import netem

    if args.per_host < 1 or args.peers % args.per_host:
        raise PcclError(f"--per-host {args.per_host} must divide --peers {args.peers}")
    ok, why = netem.available(args.prefix)
    if not ok:
        raise PcclError(f"bench-wan needs network namespaces: {why}")
    netem.down(args.prefix)
    hosts = netem.up(args.peers // args.per_host, args.prefix, rate=args.rate if not args.per_flow_rate else None,
                     per_flow_rate=args.per_flow_rate, flows=args.flows, subnet=args.subnet)
    ks = args.connections.split(",")
    masters = [pccl.Master(hosts.address(0), 0).start() for _ in ks]
    procs: list[subprocess.Popen] = []
    trials = []
    kernels = None
    try:
        common = ["--master", ",".join(m.address for m in masters), "--peers", str(args.peers), "--mib",
                  str(args.mib), "--connections", args.connections, "--quantization", args.quantization,
                  "--repeats", str(args.repeats), "--timeout", str(args.timeout), "--per-host", str(args.per_host),
                  "--algorithms", args.algorithms]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i in range(args.peers):
            h = 1 + i // args.per_host
            argv = [sys.executable, "-m", "pccl.bench_wan", "peer", "--index", str(i),
                    "--advertise", hosts.address(h)] + common
            procs.append(hosts.run(h, argv, stdout=subprocess.PIPE, text=True, env=env))
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            ev = json.loads(line)
            if ev["event"] == "codec_kernels":
                kernels = ev
                print(f"  codec kernels: {'compiled (numba)' if ev['compiled'] else 'numpy: ' + ev['why_not']}")
                continue
            trials.append(ev)
            print(f"  trial {ev['trial']} K={ev['connections']} {ev['quantization']:>5} {ev['algorithm']} "
                  f"(ran {ev['ran']}): {ev['seconds']:.3f} s", flush=True)
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
    algos = args.algorithms.split(",")
    for k in ks:
        for q in args.quantization.split(","):
            for a in algos:
                mine = [t for t in trials if str(t["connections"]) == k and t["quantization"] == q
                        and t["algorithm"] == a]
                ts = [t["seconds"] for t in mine]
                med = statistics.median(ts)
                name = f"K={k} {q}" + (f" {a}" if algos != ["auto"] else "")
                cells[name] = {"seconds": ts, "median_s": med, "busbw_GBps": nbytes / med * factor / 1e9,
                               "ran": sorted({t["ran"] for t in mine}), "ring": mine[-1]["ring"]}
    summary = {"peers": args.peers, "per_host": args.per_host, "mib": args.mib, "rate": args.rate,
               "per_flow_rate": args.per_flow_rate, "flows": args.flows, "codec_kernels": kernels, "cells": cells}
    first = next(iter(cells))
    base = cells[first]["median_s"]
    for name, c in cells.items():
        print(f"{name:>20}: median {c['median_s']:.3f} s, busbw {c['busbw_GBps'] * 1e3:.1f} MB/s, "
              f"{base / c['median_s']:.2f}x vs {first} (ran {', '.join(c['ran'])})")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pccl bench-wan", description=__doc__.split("\n")[0])
    p.add_argument("role", nargs="?", default="run", choices=["run", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--quantization", default="none,uint8,fp4", help="comma-separated codecs")
    p.add_argument("--connections", default="2", help="comma-separated K values, e.g. 1,4")
    p.add_argument("--per-host", type=int, default=1, help="peers per emulated host (must divide --peers)")
    p.add_argument("--algorithms", default="auto", help="comma-separated, e.g. ring,hierarchical,auto")
    p.add_argument("--rate", default="1gbit", help="per-host link rate (tbf)")
    p.add_argument("--per-flow-rate", default=None, help="cap each TCP flow instead (htb + u32)")
    p.add_argument("--flows", type=int, default=64, help="per-flow classes (source-port residues)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--prefix", default="pccl", help="name prefix of the emulated hosts (pccl.netem)")
    p.add_argument("--subnet", type=int, default=0, help="198.18.SUBNET.0/24 for the hosts")
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

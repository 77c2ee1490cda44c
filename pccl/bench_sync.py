"""``pccl bench-sync``: a joiner downloading the shared state from several holders at once versus
from one, measured interleaved in the same run.

How it works
1. With ``--netns`` (root), ``pccl.netem`` builds one emulated host per holder, each behind its own
   rate-limited link (``--rate``, default 1gbit); the master and the joiner run in the root
   namespace. Without it everything runs on loopback.
2. Two masters, two worlds sharing the holders' processes: world A = every holder + the joiner,
   world B = holder 1 (a second communicator in the same process, behind the same link) + the
   joiner. (Two masters rather than two peer groups: admission is global to a master, and one
   process cannot vote with two communicators at once.)
3. Each trial the joiner makes a fresh all-zero state (a joiner at revision 0) and syncs it in
   world A (multi-source: every holder serves), then in world B (single source); the holders
   sync in a loop in the same order, so each joiner call measures one full download.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from pccl.errors import PcclError


def _state(mib: int, joiner: bool):
    from pccl.shared_state import SharedState

    n = (mib << 20) // 4
    arr = np.zeros(n, np.float32) if joiner else np.arange(n, dtype=np.uint32).view(np.float32)
    return SharedState({"params": arr}, revision=0 if joiner else 1)


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _holder(args) -> None:
    import pccl

    masters = args.master.split(",")[: 2 if args.index == 0 else 1]
    comms = [pccl.Communicator(addr, connections=args.connections, advertise_host=args.advertise)
             for addr in masters]
    for c in comms:
        c.connect(timeout=args.timeout)
    base = _state(args.mib, joiner=False)
    states = [pccl.SharedState(dict(base.tensors), revision=1) for _ in comms]
    _emit(event="ready", index=args.index)
    want = (args.holders + 1, 2)[: len(comms)]
    end = time.monotonic() + args.timeout
    while time.monotonic() < end:
        if any(c.world_size < w for c, w in zip(comms, want)):
            # Sync only in complete worlds: a sync would wait for a joiner that is still being
            # admitted to the other world, and its admission needs this process's vote.
            for c in comms:
                if c.are_peers_pending():
                    c.update_topology()
            time.sleep(0.05)
            continue
        for c, st in zip(comms, states):
            try:
                c.sync_shared_state(st, timeout=args.timeout)
                st.revision += 1
            except pccl.RETRYABLE:
                c.update_topology()


def _joiner(args) -> None:
    import pccl

    comms = [pccl.Communicator(addr, connections=args.connections, advertise_host=args.advertise)
             for addr in args.master.split(",")]
    for c in reversed(comms):  # world B first: holder 1 admits it between its world-A syncs
        c.connect(timeout=args.timeout)
    want = (args.holders + 1, 2)
    deadline = time.monotonic() + args.timeout
    while any(c.world_size < w for c, w in zip(comms, want)):
        if time.monotonic() > deadline:
            raise PcclError(f"world sizes {[c.world_size for c in comms]}, expected {want}")
        for c in comms:
            if c.are_peers_pending():
                c.update_topology()
        time.sleep(0.05)
    _emit(event="ready", index=-1)
    for trial in range(args.repeats):
        for label, c in (("multi", comms[0]), ("single", comms[1])):
            st = _state(args.mib, joiner=True)
            st["params"].fill(0.0)
            t0 = time.perf_counter()
            info = c.sync_shared_state(st, timeout=args.timeout)
            dt = time.perf_counter() - t0
            _emit(event="trial", trial=trial, mode=label, seconds=dt, rx=info.rx_bytes,
                  holders=args.holders if label == "multi" else 1)
    for c in comms:
        c.close()
    os._exit(0)  # the holders are killed by the driver


def run(args) -> dict:
    """Drive one benchmark run; returns the summary (also printed)."""
    import pccl
    from pccl import netem

    hosts = None
    if args.netns:
        ok, why = netem.available()
        if not ok:
            raise PcclError(f"--netns needs network namespaces: {why}")
        netem.down()
        hosts = netem.up(args.holders, rate=args.rate)
        master_host = hosts.address(0)
    else:
        master_host = "127.0.0.1"
    masters = [pccl.Master(master_host, 0).start() for _ in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        common = ["--master", ",".join(m.address for m in masters), "--mib", str(args.mib), "--holders", str(args.holders),
                  "--connections", str(args.connections), "--timeout", str(args.timeout)]
        me = [sys.executable, "-m", "pccl.bench_sync"]
        for i in range(args.holders):
            adv = hosts.address(i + 1) if hosts else "127.0.0.1"
            argv = me + ["holder", "--index", str(i), "--advertise", adv] + common
            procs.append(hosts.run(i + 1, argv, stdout=subprocess.PIPE, text=True) if hosts else
                         subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        for p in procs:  # the joiner comes once every holder is in (admission needs their votes)
            assert p.stdout is not None
            line = p.stdout.readline()
            if '"ready"' not in line:
                raise PcclError(f"a holder did not start: {line!r}")
        joiner = subprocess.Popen(me + ["joiner", "--advertise", master_host, "--repeats", str(args.repeats)] + common,
                                  stdout=subprocess.PIPE, text=True)
        procs.append(joiner)
        trials = []
        assert joiner.stdout is not None
        for line in joiner.stdout:
            ev = json.loads(line)
            if ev.get("event") == "trial":
                trials.append(ev)
                print(f"  trial {ev['trial']} {ev['mode']:>6}: {ev['seconds']:.3f} s "
                      f"({ev['rx'] / ev['seconds'] / 1e6:.1f} MB/s)", flush=True)
        if joiner.wait(args.timeout) != 0 or len(trials) != 2 * args.repeats:
            raise PcclError("the joiner did not finish every trial")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for m in masters:
            m.close()
        if hosts is not None:
            hosts.down()
    multi = [t["seconds"] for t in trials if t["mode"] == "multi"]
    single = [t["seconds"] for t in trials if t["mode"] == "single"]
    ratios = [s / m for s, m in zip(single, multi)]
    summary = {"mib": args.mib, "holders": args.holders, "netns": bool(args.netns), "rate": args.rate if args.netns
               else None, "connections": args.connections, "multi_s": multi, "single_s": single,
               "median_multi_s": statistics.median(multi), "median_single_s": statistics.median(single),
               "speedup_per_trial": ratios, "median_speedup": statistics.median(ratios)}
    print(f"multi-source ({args.holders} holders) median {summary['median_multi_s']:.3f} s, single source "
          f"median {summary['median_single_s']:.3f} s, speed-up median {summary['median_speedup']:.2f}x "
          f"(per trial {', '.join(f'{r:.2f}' for r in ratios)})")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pccl bench-sync", description=__doc__.split("\n")[0])
    p.add_argument("role", nargs="?", default="run", choices=["run", "holder", "joiner"], help=argparse.SUPPRESS)
    p.add_argument("--holders", type=int, default=3)
    p.add_argument("--mib", type=int, default=256, help="state size in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--netns", action="store_true", help="put each holder in a namespace behind --rate (root)")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--master", help=argparse.SUPPRESS)  # the holder/joiner roles are started by "run"
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--advertise", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "holder":
        _holder(args)
        return 0
    if args.role == "joiner":
        _joiner(args)
        return 0
    summary = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

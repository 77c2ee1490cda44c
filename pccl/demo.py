"""``pccl demo``: a master and N local peers all-reduce a large buffer in a loop while a peer is
killed with SIGKILL every few seconds and a replacement joins.

Each peer fills its buffer with values derived from its peer id, so after every all-reduce it can
check the result *exactly* (integers held in float32). It reports a digest of every result keyed
by (world revision, op index within the revision): the same key means the same collective on
every peer, so the orchestrator checks that all digests of one key are identical.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

import numpy as np


# ---------------------------------------------------------------------------------------- peer
def _peer_value(pid: int) -> int:
    return pid % 61 + 1


def _emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _equal(a: np.ndarray, b: np.ndarray, block: int = 1 << 20) -> bool:
    """Exact comparison in blocks (no array-sized temporaries)."""
    return all(np.array_equal(a[i:i + block], b[i:i + block]) for i in range(0, a.size, block))


def peer_main(size_mb: float) -> int:
    import pccl

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    count = int(size_mb * (1 << 20)) // 4
    pattern = (np.arange(count, dtype=np.int64) % 7).astype(np.float32)
    comm = pccl.Communicator()
    comm.connect()
    _emit(ev="joined", peer=comm.peer_id)
    buf = np.empty(count, dtype=np.float32)
    expect = np.empty(count, dtype=np.float32)  # reused: fresh large buffers page-fault slowly
    index_in_revision, revision = 0, comm.revision
    while not stop.is_set():
        try:
            if comm.are_peers_pending():
                comm.update_topology()
            if comm.revision != revision:
                revision, index_in_revision = comm.revision, 0
            ring = comm.topology
            if len(ring) == 1:
                stop.wait(0.05)  # alone: nothing to reduce with; wait for peers to join
            np.add(pattern, np.float32(_peer_value(comm.peer_id)), out=buf)
            info = comm.all_reduce(buf)
        except pccl.RETRYABLE as exc:
            _emit(ev="retry", peer=comm.peer_id, error=type(exc).__name__)
            while not stop.is_set():
                try:
                    comm.update_topology()
                    break
                except pccl.RETRYABLE:
                    continue
            continue
        except (pccl.Kicked, pccl.MasterUnreachable) as exc:
            _emit(ev="fatal", peer=comm.peer_id, error=f"{type(exc).__name__}: {exc}")
            return 1
        np.multiply(pattern, np.float32(len(ring)), out=expect)
        np.add(expect, np.float32(sum(_peer_value(p) for p in ring)), out=expect)
        exact = _equal(buf, expect)
        digest = hashlib.sha256(buf.view(np.uint8)).hexdigest()[:16]
        _emit(ev="op", peer=comm.peer_id, key=[revision, index_in_revision], world=info.world_size,
              exact=exact, digest=digest, seconds=info.seconds, bytes=count * 4)
        index_in_revision += 1
    comm.close()
    return 0


# ---------------------------------------------------------------------------------------- orchestrator
class _Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: dict[int, subprocess.Popen] = {}
        self.next_index = 0
        self.lock = threading.Lock()
        self.digests: dict[tuple[int, int], dict[int, str]] = defaultdict(dict)
        self.inexact: list[dict] = []
        self.fatal: list[dict] = []
        self.ops = 0
        self.kills = 0
        self.joins = 0
        self.retries = 0
        self.joined = 0
        self.last_world = 0
        self.recent: list[tuple[float, float]] = []  # (time, busbw GB/s)
        # Peers' own logs (warnings, tracebacks) go to a file, so the live line stays readable.
        self.stderr = open(args.log, "w") if args.log else subprocess.DEVNULL

    def spawn(self, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-u", "-m", "pccl.demo", "--peer", "--size-mb", str(self.args.size_mb)]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=self.stderr,
                             stdin=subprocess.DEVNULL, text=True)
        idx = self.next_index
        self.next_index += 1
        self.procs[idx] = p
        threading.Thread(target=self.read, args=(p,), daemon=True).start()

    def read(self, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                kind = ev.get("ev")
                if kind == "joined":
                    self.joined += 1
                elif kind == "op":
                    self.digests[tuple(ev["key"])][ev["peer"]] = ev["digest"]
                    if not ev["exact"]:
                        self.inexact.append(ev)
                    n = ev["world"]
                    if ev["seconds"] > 0 and n > 1:
                        bw = ev["bytes"] / ev["seconds"] * 2 * (n - 1) / n / 1e9
                        self.recent.append((time.monotonic(), bw))
                    self.last_world = n
                elif kind == "retry":
                    self.retries += 1
                elif kind == "fatal":
                    self.fatal.append(ev)

    def status_line(self, elapsed: float) -> str:
        with self.lock:
            keys = len(self.digests)
            now = time.monotonic()
            self.recent = [(t, b) for t, b in self.recent if now - t < 3.0]
            bw = float(np.median([b for _, b in self.recent])) if self.recent else 0.0
            return (f"\r[{elapsed:5.1f}s] all-reduces {keys:4d} | world {self.last_world} | "
                    f"busbw {bw:5.2f} GB/s | kills survived {self.kills:2d} | joins {self.joins:2d} | "
                    f"retries {self.retries:3d}   ")

    def run(self) -> int:
        from pccl.master import Master

        args = self.args
        rng = random.Random(args.seed)
        master = Master("127.0.0.1", 0).start()
        env = dict(os.environ, PCCL_MASTER=master.address, PYTHONUNBUFFERED="1")
        print(f"pccl demo: master {master.address}, {args.peers} peers, {args.size_mb:g} MiB float32 "
              f"all-reduce, SIGKILL every {args.kill_every:g}s, {args.duration:g}s (seed {args.seed})")
        tty = sys.stdout.isatty()
        try:
            for _ in range(args.peers):
                self.spawn(env)
            start = time.monotonic()
            next_kill = start + args.kill_every + 2.0
            last_print = 0.0
            while (elapsed := time.monotonic() - start) < args.duration:
                time.sleep(0.1)
                now = time.monotonic()
                with self.lock:
                    settled = self.joined >= len(self.procs)  # the last replacement is in
                if now >= next_kill and settled:
                    alive = [i for i, p in self.procs.items() if p.poll() is None]
                    if len(alive) > 1:
                        victim = rng.choice(alive)
                        self.procs[victim].kill()
                        self.kills += 1
                        self.spawn(env)
                        self.joins += 1
                    next_kill = now + args.kill_every
                if tty:
                    print(self.status_line(elapsed), end="", flush=True)
                elif now - last_print >= 2.0:
                    print(self.status_line(elapsed).strip("\r").rstrip(), flush=True)
                    last_print = now
        finally:
            for p in self.procs.values():
                if p.poll() is None:
                    p.terminate()
            for p in self.procs.values():
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            master.close()
        if tty:
            print()
        return self.verdict()

    def verdict(self) -> int:
        with self.lock:
            mismatched = {k: v for k, v in self.digests.items() if len(set(v.values())) > 1}
            total = len(self.digests)
            reports = sum(len(v) for v in self.digests.values())
        print(f"completed all-reduces: {total} ({reports} peer results), kills survived: {self.kills}, "
              f"joins: {self.joins}, retries after failures: {self.retries}")
        ok = True
        if total == 0:
            print("VERDICT: FAIL - no all-reduce completed")
            ok = False
        if self.inexact:
            print(f"VERDICT: FAIL - {len(self.inexact)} results were not exact, e.g. {self.inexact[0]}")
            ok = False
        if mismatched:
            print(f"VERDICT: FAIL - {len(mismatched)} all-reduces differ between peers")
            ok = False
        if self.fatal:
            print(f"note: {len(self.fatal)} peers hit fatal errors, e.g. {self.fatal[0]}")
        if ok:
            print("VERDICT: PASS - every completed all-reduce was exact and bit-identical on every peer")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pccl demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size-mb", type=float, default=64.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--kill-every", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log", default="pccl-demo.log", help="peers' stderr goes here ('' to discard)")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer:
        return peer_main(args.size_mb)
    return _Demo(args).run()


if __name__ == "__main__":
    sys.exit(main())

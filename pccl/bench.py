"""``pccl bench``: all-reduce bus bandwidth of pccl against torch.distributed (gloo), same run, loopback.

    pccl bench --peers 2 3 4 --sizes 1 16 64 256 --iters 5 --repeats 3 [--json R.json] [--markdown R.md]

How it works
1. For each world size N the parent starts a master (in this process), N pccl worker processes and
   N gloo worker processes (``spawn``; only the gloo workers import torch). All 2N stay alive for
   the whole N. The parent drives them over multiprocessing pipes; a worker that is not measuring
   blocks in ``recv`` on its pipe, so the idle system costs no CPU.
2. Measurements are interleaved so that machine drift hits both systems alike: for each repeat,
   for each size, one pccl measurement and then one gloo measurement.
3. One measurement, on every rank: fill a preallocated float buffer with ``rank + 1``, run the
   warmup all-reduces, refill, barrier (a one-element all-reduce), time ``iters`` consecutive
   in-place SUM all-reduces of the buffer. Per-op time = elapsed / iters; the parent takes the
   maximum over ranks. busbw = S / t * 2(N-1)/N (S in bytes, GB = 1e9 B). With ``--tensors T``
   the buffer is T equal tensors (views) and one "op" is the whole list: pccl's
   ``all_reduce_many`` against T gloo ``all_reduce(async_op=True)`` calls queued before waiting.
   With ``--out-of-place`` pccl reduces the buffer into a second one (``all_reduce(src, dst)``),
   which needs no backup copy of the input for restore-on-failure; gloo stays in place.
4. Correctness guard: after the timed loop every element must equal N(N+1)/2 * N^(iters-1)
   (integers, exact in float32 below 2^24; out of place, dst must hold N(N+1)/2 and src be
   unchanged). A mismatch fails the run loudly (exit status 1).
5. Reported per (system, N, size): the median over repeats of busbw and of time per op; the ratio
   is pccl / gloo of the medians. Each repeat of each N also measures the host's loopback TCP
   throughput (:func:`loopback_rate`: two connections, one per direction); a ring of N peers
   moves 2(N−1)·S bytes through loopback, so its busbw cap is that rate / N (DESIGN.md §5), and
   "pccl/cap" is pccl's busbw as a fraction of the cap (median rate over the repeats).
6. Everything is bounded: every wait has a deadline; a worker that dies or reports an error stops
   the run, and every child is killed in ``finally`` (children also die with the parent through
   PR_SET_PDEATHSIG and a parent watchdog).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait as mp_wait
from typing import Any

MiB = 1 << 20
_DTYPES = ("float32", "float64")


class BenchError(RuntimeError):
    """A worker failed, died, timed out, or produced a wrong result."""


# ====================================================================== worker side
def _die_with_parent() -> None:
    """Make sure a worker never outlives the bench process."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the watchdog below still works
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="bench-parent-watchdog", daemon=True).start()


def _expected(n: int, iters: int) -> float:
    """Every element after ``iters`` in-place SUMs of buffers filled with rank + 1."""
    return n * (n + 1) / 2 * float(n) ** (iters - 1)


def _check(values: Any, n: int, iters: int, np: Any) -> str | None:
    """None if ``values`` (a numpy array) is right everywhere, else what is wrong."""
    want = _expected(n, iters)
    exact = want < 2 ** 24 if values.dtype == np.float32 else want < 2 ** 53
    if exact:
        bad = values != values.dtype.type(want)
    else:
        bad = ~np.isclose(values, want, rtol=1e-5, atol=0.0)
    if not bad.any():
        return None
    idx = np.flatnonzero(bad)
    return (f"{idx.size} of {values.size} elements wrong after {iters} all-reduces; expected {want!r}, "
            f"first bad index {int(idx[0])} holds {values[idx[0]]!r}")


def _worker_loop(conn: Connection, measure, join=None, close=None) -> None:
    """Serve commands until ``quit``; any exception is reported to the parent."""
    try:
        while True:
            msg = conn.recv()  # blocks: an idle worker uses no CPU
            cmd = msg[0]
            if cmd == "measure":
                conn.send(("result",) + measure(*msg[1:]))
            elif cmd in ("connect", "grow") and join is not None:
                conn.send(join(*msg))
            elif cmd == "quit":
                if close is not None:
                    close()
                conn.send(("bye",))
                return
            else:
                raise BenchError(f"unknown command {cmd!r}")
    except EOFError:
        return  # the parent went away
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        raise SystemExit(1)


def _pccl_worker(conn: Connection, index: int, master: str, connections: int, dtype: str,
                 setup_timeout: float) -> None:
    _die_with_parent()
    import numpy as np

    import pccl

    comm: pccl.Communicator | None = None
    tiny = np.zeros(1, dtype=dtype)

    def join(cmd: str, *args: Any) -> tuple:
        nonlocal comm
        if cmd == "connect":
            # The compiled kernels (the codecs, the backup's non-temporal copy) load in the
            # background on first use; a long job runs with them, so load them before timing.
            from pccl.algorithms import codecs

            codecs.load_kernels()
            comm = pccl.Communicator(master=master, connections=connections)
            comm.connect(timeout=setup_timeout)
            return ("connected", index, comm.world_size)
        n, optimize = args
        assert comm is not None
        deadline = time.monotonic() + setup_timeout
        while comm.world_size < n:
            if time.monotonic() > deadline:
                raise BenchError(f"pccl world reached only {comm.world_size} of {n} peers in {setup_timeout:.0f} s")
            if comm.are_peers_pending():
                comm.update_topology()
            else:
                time.sleep(0.02)
        if comm.world_size != n:
            raise BenchError(f"pccl world has {comm.world_size} peers, expected {n}")
        if optimize:  # every peer votes; AUTO then uses the measured link figures
            comm.optimize_topology(timeout=setup_timeout)
        return ("ready", index, comm.rank, comm.world_size, os.getpid())

    def measure(nbytes: int, iters: int, warmup: int, algorithm: str = "auto", tensors: int = 1,
                out_of_place: bool = False) -> tuple:
        assert comm is not None
        n, rank = comm.world_size, comm.rank
        buf = np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
        parts = np.array_split(buf, tensors)  # views of buf
        dst = np.empty_like(buf) if out_of_place else None

        def reduce() -> Any:
            if tensors == 1:
                return comm.all_reduce(buf, dst, algorithm=algorithm)
            return comm.all_reduce_many(parts, algorithm=algorithm)[0]

        buf.fill(rank + 1)
        for _ in range(warmup):
            reduce()
        buf.fill(rank + 1)
        comm.all_reduce(tiny, algorithm="ring")  # barrier
        t0 = time.perf_counter()
        for _ in range(iters):
            info = reduce()
        dt = time.perf_counter() - t0
        if dst is None:
            problem = _check(buf, n, iters, np)
        else:  # every op reduced the same input: one op's sum, and the input untouched
            problem = _check(dst, n, 1, np) or (None if (buf == rank + 1).all() else "the input changed")
        return (rank, dt / iters, problem, info.algorithm)

    def close() -> None:
        if comm is not None:
            comm.close()

    conn.send(("hello", index, os.getpid()))
    try:
        _worker_loop(conn, measure, join, close)
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:  # noqa: BLE001
                pass


def _gloo_worker(conn: Connection, rank: int, n: int, init_method: str, dtype: str, timeout: float) -> None:
    _die_with_parent()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import datetime

    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # gloo reduces on its own thread; no OpenMP pool spinning next to pccl
    conn.send(("hello", rank, os.getpid()))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=timeout))
    tdtype = getattr(torch, dtype)
    tiny = torch.zeros(1, dtype=tdtype)
    conn.send(("ready", rank, rank, n, os.getpid(), torch.__version__))

    def measure(nbytes: int, iters: int, warmup: int, _algorithm: str = "", tensors: int = 1,
                _out_of_place: bool = False) -> tuple:  # gloo has no out-of-place all-reduce
        buf = torch.empty(nbytes // tiny.element_size(), dtype=tdtype)
        parts = torch.tensor_split(buf, tensors)  # views of buf

        def reduce() -> None:
            if tensors == 1:
                dist.all_reduce(buf)
                return
            # one op per tensor, all queued at once: gloo's own pipeline, no Python between ops
            for work in [dist.all_reduce(p, async_op=True) for p in parts]:
                work.wait()

        buf.fill_(rank + 1)
        for _ in range(warmup):
            reduce()
        buf.fill_(rank + 1)
        dist.all_reduce(tiny)  # barrier
        t0 = time.perf_counter()
        for _ in range(iters):
            reduce()
        dt = time.perf_counter() - t0
        return (rank, dt / iters, _check(buf.numpy(), n, iters, np), "gloo")

    _worker_loop(conn, measure)
    # destroy_process_group() and torch's interpreter teardown take seconds; nothing needs flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ====================================================================== parent side
@dataclass
class _Worker:
    system: str
    index: int
    proc: Any
    conn: Connection
    rank: int = -1
    pid: int = 0


@dataclass
class _Group:
    """All live workers of one world size (both systems), with failure detection on every wait."""

    workers: list[_Worker] = field(default_factory=list)

    def of(self, system: str) -> list[_Worker]:
        return [w for w in self.workers if w.system == system]

    def send(self, w: _Worker, msg: tuple) -> None:
        try:
            w.conn.send(msg)
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise BenchError(f"{w.system} worker {w.index} is gone ({exc}); exit code {w.proc.exitcode}") from None

    def collect(self, targets: list[_Worker], timeout: float, what: str, on_reply=None) -> dict[int, tuple]:
        """One reply from every target (``on_reply`` may ask for more); any death or error raises."""
        waiting = {w.conn: w for w in targets}
        sentinels = {w.proc.sentinel: w for w in self.workers}
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                late = ", ".join(f"{w.system} worker {w.index}" for w in waiting.values())
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what} ({late})")
            ready = mp_wait(list(waiting) + list(sentinels), timeout=min(left, 1.0))
            for r in sorted(ready, key=lambda r: r in sentinels):  # replies before deaths
                if r in waiting:
                    w = waiting[r]
                    try:
                        msg = r.recv()
                    except (EOFError, OSError):
                        w.proc.join(1.0)
                        raise BenchError(f"{w.system} worker {w.index} died during {what} "
                                         f"(exit code {w.proc.exitcode})") from None
                    if msg[0] == "error":
                        raise BenchError(f"{w.system} worker {w.index} failed during {what}:\n{msg[1]}")
                    if on_reply is not None and on_reply(w, msg):
                        continue  # keep waiting for this worker's next reply
                    replies[w.index] = msg
                    del waiting[r]
                elif r in sentinels and not (sentinels[r].conn in waiting and sentinels[r].conn.poll()):
                    w = sentinels[r]
                    w.proc.join(1.0)
                    raise BenchError(f"{w.system} worker {w.index} (pid {w.proc.pid}) died during {what} "
                                     f"(exit code {w.proc.exitcode})")
        return replies

    def shutdown(self, grace: float = 10.0) -> None:
        """Ask every worker to quit, then terminate and kill whatever is left."""
        for w in self.workers:
            if w.proc.is_alive():
                try:
                    w.conn.send(("quit",))
                except Exception:  # noqa: BLE001
                    pass
        end = time.monotonic() + grace
        for w in self.workers:
            w.proc.join(max(end - time.monotonic(), 0.01))
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.terminate()
        end = time.monotonic() + 3.0
        for w in self.workers:
            w.proc.join(max(end - time.monotonic(), 0.01))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(3.0)
        for w in self.workers:
            try:
                w.conn.close()
            except Exception:  # noqa: BLE001
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(ctx, group: _Group, system: str, index: int, target, args: tuple) -> None:
    parent_end, child_end = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=target, args=(child_end,) + args, name=f"pccl-bench-{system}-{index}", daemon=True)
    proc.start()
    child_end.close()
    group.workers.append(_Worker(system, index, proc, parent_end))


def _start_world(ctx, group: _Group, n: int, master: str, opts: argparse.Namespace, log) -> str:
    """Start N pccl and N gloo workers and form both worlds; returns the torch version."""
    init = f"tcp://127.0.0.1:{_free_port()}"
    for i in range(n):
        _spawn(ctx, group, "pccl", i, _pccl_worker, (i, master, opts.connections, opts.dtype, opts.setup_timeout))
    for i in range(n):
        _spawn(ctx, group, "gloo", i, _gloo_worker, (i, n, init, opts.dtype, opts.timeout))
    pw, gw = group.of("pccl"), group.of("gloo")
    group.collect(pw, opts.setup_timeout, "pccl worker start-up")
    # pccl: the first peer is admitted at once; the others are admitted by update_topology votes.
    group.send(pw[0], ("connect",))
    group.collect(pw[:1], opts.setup_timeout, "the first pccl peer's connect")
    for w in pw[1:]:
        group.send(w, ("connect",))
    group.send(pw[0], ("grow", n, opts.optimize))

    def on_connected(w: _Worker, msg: tuple) -> bool:
        if msg[0] == "connected":
            group.send(w, ("grow", n, opts.optimize))
            return True
        return False

    for idx, msg in group.collect(pw, opts.setup_timeout, f"the pccl world of {n}", on_connected).items():
        pw[idx].rank, pw[idx].pid = msg[2], msg[4]
    if sorted(w.rank for w in pw) != list(range(n)):
        raise BenchError(f"pccl ranks are {[w.rank for w in pw]}, expected a permutation of 0..{n - 1}")
    group.collect(gw, opts.setup_timeout, "gloo worker start-up")
    replies = group.collect(gw, opts.setup_timeout, f"the gloo world of {n} (init_process_group)")
    for idx, msg in replies.items():
        gw[idx].rank, gw[idx].pid = msg[2], msg[4]
    log(f"N={n}: pccl pids {[w.pid for w in pw]} (ranks {[w.rank for w in pw]}), gloo pids {[w.pid for w in gw]}")
    return replies[0][5]


def _measure(group: _Group, system: str, nbytes: int, opts: argparse.Namespace,
             algorithm: str = "auto") -> tuple[float, list[float], str]:
    """(max per-op seconds over ranks, per-rank per-op seconds by rank, the algorithm that ran)."""
    ws = group.of(system)
    for w in ws:
        group.send(w, ("measure", nbytes, opts.iters, opts.warmup, algorithm, opts.tensors, opts.out_of_place))
    replies = group.collect(ws, opts.timeout, f"a {system} measurement of {_fmt_size(nbytes)}")
    per_rank = [0.0] * len(ws)
    ran = set()
    for msg in replies.values():
        _, rank, t, problem, algo = msg
        if problem is not None:
            raise BenchError(f"WRONG RESULT from {system} rank {rank} ({_fmt_size(nbytes)}): {problem}")
        per_rank[rank] = t
        ran.add(algo)
    if len(ran) != 1:
        raise BenchError(f"ranks ran different algorithms: {sorted(ran)}")
    return max(per_rank), per_rank, ran.pop()


# ====================================================================== formatting and CLI
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(?:i?[bB])?\s*$")


def parse_size(text: str) -> int:
    """Bytes from '1', '1M', '64MiB', '512K', '1G' (a bare number means MiB)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 1, 16M, 512K, 1G (bare numbers are MiB)")
    scale = {"": MiB, "k": 1 << 10, "m": MiB, "g": 1 << 30}[m.group(2).lower()]
    nbytes = int(float(m.group(1)) * scale)
    if nbytes < 8:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small")
    return nbytes


def _fmt_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    if nbytes >= MiB:
        return f"{nbytes / MiB:.2f} MiB"
    return f"{nbytes} B"


def busbw(nbytes: int, seconds: float, n: int) -> float:
    """Bus bandwidth in GB/s (1e9 B/s)."""
    return nbytes / seconds * 2 * (n - 1) / n / 1e9


def _git_revision() -> str | None:
    """The commit (and '-dirty') of the pccl source tree, when it is a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pccl bench",
                                description="all-reduce bus bandwidth of pccl vs torch.distributed gloo, "
                                            "interleaved in one run on loopback")
    p.add_argument("--peers", type=int, nargs="+", default=[2, 3, 4], help="world sizes (default 2 3 4)")
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in ("1", "4", "16", "64", "256")],
                   help="buffer sizes; bare numbers are MiB, suffixes K/M/G (default 1 4 16 64 256)")
    p.add_argument("--iters", type=int, default=5, help="timed all-reduces per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed all-reduces before each measurement (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    p.add_argument("--connections", type=int, default=2, help="pccl connections per link (default 2)")
    p.add_argument("--algorithms", nargs="+", default=["auto"], choices=["auto", "ring", "star", "hierarchical"],
                   help="pccl algorithms to measure besides AUTO (e.g. ring star: the table then says what "
                        "AUTO picked and which forced algorithm was fastest)")
    p.add_argument("--tensors", type=int, default=1,
                   help="split each buffer into this many equal tensors: pccl reduces them with one "
                        "all_reduce_many call (small ones coalesced into buckets), gloo with one async "
                        "all_reduce per tensor, all queued before waiting; times are per list (default 1)")
    p.add_argument("--optimize", action="store_true",
                   help="each pccl world runs optimize_topology() once formed: bandwidth probes between "
                        "every pair, whose figures AUTO then uses instead of Config's link rates")
    p.add_argument("--out-of-place", action="store_true",
                   help="pccl reduces into a second buffer (all_reduce(src, dst)), so it keeps no backup copy "
                        "of the input for restore-on-failure; gloo stays in place (torch.distributed has no "
                        "out-of-place all-reduce)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--json", metavar="PATH", help="write every raw measurement and the summary as JSON")
    p.add_argument("--markdown", metavar="PATH", help="append the table (and the command line) to this file")
    p.add_argument("--plot", metavar="PATH.png", help="plot busbw against size (needs matplotlib)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per measurement (default 300)")
    p.add_argument("--setup-timeout", type=float, default=180.0,
                   help="seconds allowed to start the workers and form each world (default 180)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final table")
    return p


def _validate(opts: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if any(n < 2 for n in opts.peers):
        p.error("--peers: every world size must be at least 2")
    if not 1 <= opts.iters <= 40:
        p.error("--iters must be in 1..40 (values grow by N per in-place all-reduce)")
    if opts.warmup < 0 or opts.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    if not 1 <= opts.connections <= 16:
        p.error("--connections must be in 1..16")
    item = 4 if opts.dtype == "float32" else 8
    if opts.tensors < 1:
        p.error("--tensors must be at least 1")
    if opts.out_of_place and opts.tensors > 1:
        p.error("--out-of-place applies to single tensors (all_reduce_many reduces in place)")
    for s in opts.sizes:
        if s % item:
            p.error(f"size {s} B is not a multiple of the {opts.dtype} item size")
        if s // item < opts.tensors:
            p.error(f"size {s} B holds fewer than --tensors {opts.tensors} elements")
    if opts.timeout <= 0 or opts.setup_timeout <= 0:
        p.error("timeouts must be positive")


def _systems(opts: argparse.Namespace) -> list[tuple[str, str]]:
    """(system name, pccl algorithm) in measurement order: "pccl" is AUTO, "pccl-ring" etc. the
    forced algorithms of --algorithms, then gloo."""
    return ([("pccl", "auto")] + [(f"pccl-{a}", a) for a in opts.algorithms if a != "auto"]
            + [("gloo", "")])


def loopback_rate(seconds: float = 1.0, chunk: int = 4 * MiB, span: int = 64 * MiB, timeout: float = 10.0) -> float:
    """Bytes per second this host moves through loopback TCP (DESIGN.md §5's loopback cap): two
    connections, one per direction, each fed by a sending thread and drained by a receiving one,
    counted for ``seconds`` after a short warm-up. Each thread walks ``chunk`` by ``chunk``
    through a buffer of ``span`` bytes, larger than a CPU cache, as an all-reduce of large
    buffers does (one reused 4 MiB buffer stays in the cache and measured up to 2× more). A ring
    of N peers on one host moves 2(N−1)·S bytes through loopback per op, so its busbw
    (S/t·2(N−1)/N) cannot exceed rate / N. Every socket has a timeout and the threads are joined
    with one, so nothing outlives the call."""
    srv = socket.create_server(("127.0.0.1", 0))
    socks: list[socket.socket] = []
    counts = [0, 0]
    stop = threading.Event()

    slices = range(0, span - chunk + 1, chunk)

    def send(sock: socket.socket) -> None:
        data = memoryview(bytearray(span))
        try:
            while not stop.is_set():
                for off in slices:
                    sock.sendall(data[off:off + chunk])
        except OSError:
            pass

    def recv(sock: socket.socket, i: int) -> None:
        buf = memoryview(bytearray(span))
        try:
            while not stop.is_set():
                for off in slices:
                    k = sock.recv_into(buf[off:off + chunk])
                    if k == 0:
                        return
                    counts[i] += k
        except OSError:
            pass

    threads = []
    try:
        srv.settimeout(timeout)
        for i in range(2):
            a = socket.create_connection(("127.0.0.1", srv.getsockname()[1]), timeout=timeout)
            b, _ = srv.accept()
            socks += [a, b]
            for x in (a, b):
                x.settimeout(timeout)
            sender, receiver = (a, b) if i == 0 else (b, a)  # one connection each way
            threads += [threading.Thread(target=send, args=(sender,), daemon=True),
                        threading.Thread(target=recv, args=(receiver, i), daemon=True)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        c0, t0 = sum(counts), time.perf_counter()
        time.sleep(seconds)
        c1, t1 = sum(counts), time.perf_counter()
        return (c1 - c0) / (t1 - t0)
    finally:
        stop.set()
        for x in socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(timeout)
        for x in socks + [srv]:
            x.close()


def _summarize(records: list[dict], peers: list[int], sizes: list[int]) -> list[dict]:
    rows = []
    systems = list(dict.fromkeys(r["system"] for r in records if r["system"] != "loopback"))
    for n in peers:
        rates = [r["loopback_gbs"] for r in records if r["system"] == "loopback" and r["n"] == n]
        for s in sizes:
            row: dict[str, Any] = {"n": n, "size_bytes": s}
            if rates:
                row["cap_gbs"] = statistics.median(rates) / n
            for system in systems:
                rs = [r for r in records if r["system"] == system and r["n"] == n and r["size_bytes"] == s]
                if not rs:
                    continue
                bws = [r["busbw_gbs"] for r in rs]
                row[f"{system}_busbw_gbs"] = statistics.median(bws)
                row[f"{system}_busbw_min_max"] = [min(bws), max(bws)]
                row[f"{system}_ms"] = statistics.median(r["seconds_per_op"] for r in rs) * 1e3
                if system == "pccl":
                    row["auto_picked"] = "/".join(sorted({r["algorithm"] for r in rs}))
            forced = {k[5:-3]: v for k, v in row.items() if k.startswith("pccl-") and k.endswith("_ms")}
            if forced and "auto_picked" in row:
                row["fastest"] = min(forced, key=forced.get)
            if "pccl_busbw_gbs" in row and "gloo_busbw_gbs" in row:
                row["ratio"] = row["pccl_busbw_gbs"] / row["gloo_busbw_gbs"]
            if "cap_gbs" in row and "pccl_busbw_gbs" in row:
                row["pccl_of_cap"] = row["pccl_busbw_gbs"] / row["cap_gbs"]
            rows.append(row)
    return rows


_HEAD = ("N", "size", "pccl GB/s", "gloo GB/s", "ratio", "pccl ms", "gloo ms", "pccl/cap")


def _head(rows: list[dict]) -> list[str]:
    forced = sorted({k[5:-3] for r in rows for k in r if k.startswith("pccl-") and k.endswith("_ms")})
    return list(_HEAD) + ["AUTO ran"] + [f"{a} ms" for a in forced] + (["fastest"] if forced else [])


def _cells(row: dict, head: list[str] | None = None) -> list[str]:
    def f(key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    out = [str(row["n"]), _fmt_size(row["size_bytes"]), f("pccl_busbw_gbs", ".3f"), f("gloo_busbw_gbs", ".3f"),
           f("ratio", ".2f"), f("pccl_ms", ".2f"), f("gloo_ms", ".2f"), f("pccl_of_cap", ".2f"),
           row.get("auto_picked", "-")]
    for h in (head or [])[len(out):]:
        out.append(row.get("fastest", "-") if h == "fastest" else f(f"pccl-{h[:-3]}_ms", ".2f"))
    return out


def format_table(rows: list[dict]) -> str:
    head = _head(rows)
    cells = [head] + [_cells(r, head) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[dict], command: str, meta: dict) -> str:
    out = [f"### `{command}`", "",
           f"{meta['started']} on {meta['host']} ({meta['cpus']} CPUs); {meta['dtype']} SUM "
           + ("(pccl out of place, gloo in place), " if meta.get("out_of_place") else "in place, ")
           + (f"each buffer as {meta['tensors']} tensors (pccl all_reduce_many, gloo async ops), "
              if meta.get("tensors", 1) > 1 else "") +
           f"median of {meta['repeats']} interleaved repeats x {meta['iters']} timed ops; busbw = S/t·2(N-1)/N "
           f"(GB = 1e9 B); t = max over ranks; pccl/cap = pccl busbw / (loopback bytes/s measured in the same "
           f"run / N); torch {meta.get('torch', '?')}; pccl {meta.get('pccl_git') or '?'}", "",
           "| " + " | ".join(_head(rows)) + " |",
           "|" + "|".join("---:" if i else "---" for i in range(len(_head(rows)))) + "|"]
    out += ["| " + " | ".join(_cells(r, _head(rows))) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _plot(path: str, rows: list[dict], peers: list[int], log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"note: matplotlib is not installed; no plot written to {path} (pip install 'pccl[bench]')", force=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, n in enumerate(peers):
        rs = [r for r in rows if r["n"] == n]
        xs = [r["size_bytes"] / MiB for r in rs]
        color = f"C{k}"
        ax.plot(xs, [r.get("pccl_busbw_gbs", math.nan) for r in rs], "o-", color=color, label=f"pccl N={n}")
        ax.plot(xs, [r.get("gloo_busbw_gbs", math.nan) for r in rs], "s--", color=color, label=f"gloo N={n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("buffer size (MiB)")
    ax.set_ylabel("all-reduce busbw (GB/s)")
    ax.set_title("pccl vs torch.distributed gloo, loopback")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot written to {path}", force=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    parser = _parser()
    opts = parser.parse_args(argv)
    _validate(opts, parser)
    command = "pccl bench" + ("" if not argv else " " + shlex.join(argv))

    t_start = time.monotonic()

    def log(text: str, force: bool = False) -> None:
        if force:
            print(text, flush=True)
        elif not opts.quiet:
            print(f"[{time.monotonic() - t_start:7.1f}s] {text}", file=sys.stderr, flush=True)

    from pccl.master import Master

    meta: dict[str, Any] = {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "dtype": opts.dtype, "iters": opts.iters,
        "warmup": opts.warmup, "repeats": opts.repeats, "connections": opts.connections, "peers": opts.peers,
        "tensors": opts.tensors,
        "out_of_place": opts.out_of_place,
        "optimize": opts.optimize,
        "sizes_bytes": opts.sizes,
    }
    meta["pccl_git"] = _git_revision()
    try:
        import numpy

        meta["numpy"] = numpy.__version__
    except ImportError:
        pass
    records: list[dict] = []
    ctx = mp.get_context("spawn")
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        old_term = signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        for n in opts.peers:
            group = _Group()
            master = Master("127.0.0.1", 0).start()
            try:
                log(f"N={n}: starting {n} pccl + {n} gloo workers (master {master.address})")
                meta["torch"] = _start_world(ctx, group, n, master.address, opts, log)
                for rep in range(opts.repeats):
                    rate = loopback_rate()
                    records.append({"system": "loopback", "n": n, "repeat": rep, "loopback_gbs": rate / 1e9})
                    log(f"  N={n} rep {rep + 1}/{opts.repeats} loopback: {rate / 1e9:.2f} GB/s, "
                        f"so a ring's busbw cap is {rate / 1e9 / n:.3f} GB/s")
                    for s in opts.sizes:
                        for system, algo in _systems(opts):
                            t, per_rank, ran = _measure(group, "gloo" if system == "gloo" else "pccl", s, opts, algo)
                            rec = {"system": system, "n": n, "size_bytes": s, "repeat": rep, "seconds_per_op": t,
                                   "per_rank_seconds_per_op": per_rank, "busbw_gbs": busbw(s, t, n),
                                   "algorithm": ran}
                            records.append(rec)
                            log(f"  N={n} rep {rep + 1}/{opts.repeats} {_fmt_size(s):>8} {system}: "
                                f"{rec['busbw_gbs']:.3f} GB/s, {t * 1e3:.2f} ms/op")
            finally:
                group.shutdown()
                master.close()
    except BenchError as exc:
        print(f"pccl bench: FAILED: {exc}", file=sys.stderr, flush=True)
        status = 1
    except KeyboardInterrupt:
        print("pccl bench: interrupted; all workers stopped", file=sys.stderr, flush=True)
        status = 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["complete"] = status == 0
    rows = _summarize(records, opts.peers, opts.sizes)
    if rows and any(len(r) > 2 for r in rows):
        partial = "" if status == 0 else "PARTIAL RESULTS of a failed run; "
        print(f"\n{command}\n({partial}median of {opts.repeats} interleaved repeats; busbw GB/s = 1e9 B/s; "
              f"ratio = pccl/gloo; ms = time per op, max over ranks; pccl/cap = pccl busbw over the loopback cap "
              f"(the host's loopback bytes/s, measured in the same run, / N))\n", flush=True)
        print(format_table([r for r in rows if len(r) > 2]), flush=True)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"meta": meta, "summary": rows, "measurements": records}, fh, indent=1)
        log(f"raw results written to {opts.json}", force=True)
    if status == 0:
        if opts.markdown:
            with open(opts.markdown, "a") as fh:
                if fh.tell():
                    fh.write("\n")
                fh.write(format_markdown(rows, command, meta))
            log(f"table appended to {opts.markdown}", force=True)
        if opts.plot:
            _plot(opts.plot, rows, opts.peers, log)
    return status


if __name__ == "__main__":
    sys.exit(main())

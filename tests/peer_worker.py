"""A pccl peer process for the integration tests. Prints one JSON object per line on stdout.

    python tests/peer_worker.py SCENARIO --index I --world N [...]

The master address comes from PCCL_MASTER; timeouts from PCCL_* variables.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

import pccl

DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8"]
OPS = ["sum", "avg", "min", "max", "prod"]


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()[:24]


def join(comm: pccl.Communicator, world: int, deadline: float = 60.0) -> None:
    """Connect, then vote until ``world`` peers are in the ring."""
    end = time.monotonic() + deadline
    comm.connect()
    while comm.world_size < world:
        if time.monotonic() > end:
            raise TimeoutError(f"world stayed at {comm.world_size}")
        try:
            if comm.are_peers_pending():
                comm.update_topology()
            else:
                time.sleep(0.02)
        except pccl.RETRYABLE:
            continue
    emit("joined", peer_id=comm.peer_id, rank=comm.rank, world=comm.world_size)


def make_input(index: int, dtype: str, op: str, count: int) -> np.ndarray:
    """Deterministic per (peer index, dtype, op, count); values keep every op exact or tame."""
    rng = np.random.default_rng([index, DTYPES.index(dtype), OPS.index(op), count])
    if op == "prod":
        vals = rng.choice(np.array([1, 1, 1, 2, 3, -1] if dtype != "uint8" else [1, 1, 2, 3]), size=count)
        return vals.astype(dtype)
    if dtype.startswith("float"):
        return rng.standard_normal(count).astype(dtype) * 4
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=count, endpoint=True, dtype=dtype)


def reference(inputs: list[np.ndarray], op: str, dtype: str) -> np.ndarray:
    n = len(inputs)
    if dtype.startswith("float"):
        acc = np.stack([x.astype(np.float64) for x in inputs])
        res = {"sum": acc.sum(0), "avg": acc.sum(0) / n, "min": acc.min(0), "max": acc.max(0),
               "prod": acc.prod(0)}[op]
        return res
    out = inputs[0].copy()
    for x in inputs[1:]:
        out = {"sum": np.add, "avg": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}[op](out, x)
    if op == "avg":
        q = out // out.dtype.type(n)
        q = q + ((out < 0) & (out % out.dtype.type(n) != 0)).astype(out.dtype)
        out = q.astype(dtype)
    return out


def matrix(args) -> None:
    if args.torch:
        # Import before connecting: loading libtorch holds the GIL for seconds on a slow machine,
        # which would starve the heartbeat thread past peer_timeout (README, "Failure semantics").
        import torch  # noqa: F401
    comm = pccl.Communicator()
    join(comm, args.world)
    counts = [0, 1, max(args.world - 1, 1), args.world + 1, 1000, 100003]
    failures = []
    tag = 0
    for dtype in DTYPES:
        for op in OPS:
            for count in counts:
                inputs = [make_input(i, dtype, op, count) for i in range(args.world)]
                buf = inputs[args.index].copy()
                out = np.empty_like(buf) if count % 2 else None  # both in place and src->dst
                comm.all_reduce(buf, dst=out, op=op, tag=tag)
                tag += 1
                res = buf if out is None else out
                if out is not None and not np.array_equal(buf.view(np.uint8), inputs[args.index].view(np.uint8)):
                    failures.append(f"{dtype} {op} {count}: src modified by an out-of-place call")
                ref = reference(inputs, op, dtype)
                if dtype.startswith("float"):
                    r = res.astype(np.float64)
                    absum = np.sum(np.abs(np.stack([x.astype(np.float64) for x in inputs])), 0) if count else 0
                    eps = {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10}[dtype]
                    tol = args.world * eps * absum + (np.abs(ref) * 2.0**-10 if dtype == "float16" else 0) + 1e-30
                    if op in ("min", "max"):
                        ok = np.array_equal(r, ref.astype(dtype).astype(np.float64))
                    else:
                        ok = bool(np.all(np.abs(r - ref) <= tol))
                else:
                    ok = np.array_equal(res, ref)
                if not ok:
                    failures.append(f"{dtype} {op} {count}: wrong result")
                emit("result", dtype=dtype, op=op, count=count, digest=digest(res))
    if args.torch:
        import torch

        for dt in (torch.float32, torch.bfloat16, torch.float16):
            def inp(i):
                return torch.arange(1000, dtype=torch.float32).to(dt) * (i + 1)

            t = inp(args.index)
            comm.all_reduce(t, tag=tag)
            tag += 1
            # Each input has few significant bits, so the float32 sum is exact whatever the order.
            expect = sum(inp(i).float() for i in range(args.world)).to(dt)
            if not torch.equal(t, expect):
                failures.append(f"torch {dt}: wrong result")
            emit("result", dtype=str(dt), op="sum", count=1000,
                 digest=digest(t.view(torch.int16).numpy() if dt != torch.float32 else t.numpy()))
    emit("done", failures=failures)
    comm.close()


def loop(args) -> None:
    """All-reduce in a loop with retries; report every start, success and failure."""
    comm = pccl.Communicator(locality=args.locality)
    join(comm, args.world)
    count = args.count
    base = np.full(count, args.index + 1, dtype=np.float32)
    ok = 0
    end = time.monotonic() + args.duration
    while ok < args.ops and time.monotonic() < end:
        try:
            if comm.are_peers_pending():
                comm.update_topology()
                emit("topology", world=comm.world_size, ring=list(comm.topology))
        except (*pccl.RETRYABLE, pccl.Kicked, pccl.MasterUnreachable) as exc:
            emit("topology_fail", error=type(exc).__name__, message=str(exc))
            if isinstance(exc, (pccl.Kicked, pccl.MasterUnreachable)):  # a frozen peer may read it here
                emit("fatal", error=type(exc).__name__)
                return
            continue
        buf = base.copy()
        before = digest(buf)
        t0 = time.time()
        emit("op_start", n=ok, world=comm.world_size)
        try:
            info = comm.all_reduce(buf, algorithm=args.algorithm, timeout=args.op_timeout)
        except pccl.PcclError as exc:
            emit("op_fail", error=type(exc).__name__, message=str(exc), started=t0, restored=digest(buf) == before)
            if isinstance(exc, (pccl.Kicked, pccl.MasterUnreachable)):
                emit("fatal", error=type(exc).__name__)
                return
            try:
                comm.update_topology()
                emit("topology", world=comm.world_size, ring=list(comm.topology))
            except pccl.PcclError as exc2:
                emit("topology_fail", error=type(exc2).__name__, message=str(exc2))
                if isinstance(exc2, (pccl.Kicked, pccl.MasterUnreachable)):
                    emit("fatal", error=type(exc2).__name__)
                    return
            continue
        ok += 1
        odd = np.flatnonzero(buf != buf[0])
        emit("op_ok", n=ok, world=info.world_size, value=float(buf[0]), uniform=not odd.size,
             odd=[int(odd.size), *map(int, odd[:1]), *map(int, odd[-1:])],
             digest=digest(buf), ring=list(comm.topology), seconds=info.seconds)
        if args.pause:
            time.sleep(args.pause)
    emit("done", ok=ok)
    comm.close()


def mismatch(args) -> None:
    comm = pccl.Communicator()
    join(comm, args.world)
    buf = np.ones(100 + args.index, dtype=np.float32)  # counts differ across peers
    before = digest(buf)
    try:
        comm.all_reduce(buf)
        emit("result", error=None)
    except pccl.PcclError as exc:
        emit("result", error=type(exc).__name__, message=str(exc), restored=digest(buf) == before)
    # the group is still usable afterwards
    buf = np.ones(10, dtype=np.float32)
    comm.all_reduce(buf)
    emit("done", value=float(buf[0]))
    comm.close()


def lonely(args) -> None:
    """Peer 0 calls all_reduce alone (others do not): it must time out and restore its input."""
    comm = pccl.Communicator()
    join(comm, args.world)
    if args.index == 0:
        buf = np.arange(10, dtype=np.float32)
        before = digest(buf)
        try:
            comm.all_reduce(buf, timeout=1.0)
            emit("result", error=None)
        except pccl.PcclError as exc:
            emit("result", error=type(exc).__name__, restored=digest(buf) == before)
    else:
        time.sleep(2.0)
        emit("result", error=None)
    emit("done")
    time.sleep(0.5)
    comm.close()


def idle(args) -> None:
    """Join, then wait for the master to vanish: must raise MasterUnreachable, not hang."""
    comm = pccl.Communicator()
    join(comm, args.world)
    emit("ready")
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        try:
            comm.are_peers_pending()
        except pccl.PcclError as exc:
            emit("result", error=type(exc).__name__, message=str(exc))
            return
        time.sleep(0.1)
    emit("result", error=None)


def state(args) -> None:
    """Keep a shared state in sync in a loop (holders start with content, a joiner with zeros)."""
    comm = pccl.Communicator()
    if args.joiner:
        comm.connect()
        emit("joined", peer_id=comm.peer_id, world=comm.world_size)
    else:
        join(comm, args.holders)
    if args.slow_serve:
        from pccl.transports import state_transfer

        count = state_transfer.StateServer.count

        def slow_count(self, n, _count=count):
            emit("serving", nbytes=n)
            time.sleep(args.slow_serve)
            _count(self, n)
        state_transfer.StateServer.count = slow_count
    n = (args.state_mib << 20) // 4
    params = np.zeros(n, np.float32) if args.joiner else np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    st = pccl.SharedState({"params": params, "step": np.array([7], np.int64)}, revision=0 if args.joiner else 100)
    if args.joiner:
        st["step"][0] = 0
    synced = 0
    end = time.monotonic() + args.duration
    while synced < args.ops and time.monotonic() < end:
        try:
            if comm.are_peers_pending():
                comm.update_topology()
                emit("topology", world=comm.world_size)
            if comm.world_size < args.world and synced == 0:  # the full world only for the first sync
                time.sleep(0.05)
                continue
            emit("sync_start", world=comm.world_size)
            info = comm.sync_shared_state(st, timeout=args.op_timeout)
        except pccl.PcclError as exc:
            emit("sync_fail", error=type(exc).__name__, message=str(exc))
            if isinstance(exc, (pccl.Kicked, pccl.MasterUnreachable)):
                return
            try:
                comm.update_topology()
                emit("topology", world=comm.world_size)
            except pccl.PcclError as exc2:
                emit("topology_fail", error=type(exc2).__name__, message=str(exc2))
            continue
        synced += 1
        emit("synced", n=synced, rx=info.rx_bytes, tx=info.tx_bytes, revision=info.revision,
             world=comm.world_size, digest=digest(params) + digest(st["step"]))
        st.revision += 1
        time.sleep(args.pause)
    emit("done", synced=synced)
    time.sleep(0.5)
    comm.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--index", type=int, default=int(os.environ.get("PCCL_LOCAL_INDEX", 0)))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--count", type=int, default=1 << 20)
    p.add_argument("--ops", type=int, default=10)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--op-timeout", type=float, default=30.0)
    p.add_argument("--torch", action="store_true")
    p.add_argument("--algorithm", default="auto")
    p.add_argument("--locality", default=None)
    p.add_argument("--joiner", action="store_true")
    p.add_argument("--holders", type=int, default=1)
    p.add_argument("--state-mib", type=int, default=1)
    p.add_argument("--slow-serve", type=float, default=0.0)
    args = p.parse_args()
    try:
        {"matrix": matrix, "loop": loop, "mismatch": mismatch, "lonely": lonely, "idle": idle,
         "state": state}[args.scenario](args)
    except Exception as exc:
        emit("crash", error=type(exc).__name__, message=str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())

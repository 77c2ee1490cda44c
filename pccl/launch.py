"""``pccl launch -n N -- script.py ARGS``: a master (unless one is given) and N local peers.

Each peer runs with ``PCCL_MASTER`` (the master's address) and ``PCCL_LOCAL_INDEX`` (0..N-1) in
its environment. Output lines are prefixed with the peer index. Ctrl-C (or SIGTERM) stops every
peer (SIGTERM, then SIGKILL after a grace period). The exit status is non-zero if any peer failed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from pccl.master import Master

_GRACE = 5.0


def _pump(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            print(f"{prefix} {line}", flush=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + _GRACE
    for p in procs:
        try:
            p.wait(max(end - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(2.0)


def launch(n: int, command: list[str], master: str | None = None, host: str = "127.0.0.1") -> int:
    if n < 1:
        print("pccl launch: -n must be at least 1", file=sys.stderr)
        return 2
    own_master = None
    if master is None:
        own_master = Master(host, 0).start()
        master = own_master.address
        print(f"[launch] master at {master}", flush=True)
    if command[0].endswith(".py"):
        command = [sys.executable, "-u"] + command
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    lock = threading.Lock()
    stopping = threading.Event()

    def on_term(*_: object) -> None:
        stopping.set()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        for i in range(n):
            env = dict(os.environ, PCCL_MASTER=master, PCCL_LOCAL_INDEX=str(i), PYTHONUNBUFFERED="1")
            p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p, f"[peer {i}]", lock), daemon=True)
            t.start()
            pumps.append(t)
        while not stopping.is_set() and any(p.poll() is None for p in procs):
            time.sleep(0.1)
    except KeyboardInterrupt:
        stopping.set()
    finally:
        signal.signal(signal.SIGTERM, old)
        _stop(procs)
        for t in pumps:
            t.join(2.0)
        if own_master is not None:
            own_master.close()
    codes = [p.returncode for p in procs]
    failed = [i for i, c in enumerate(codes) if c != 0]
    if stopping.is_set():
        print("[launch] stopped", flush=True)
        return 130
    if failed:
        print(f"[launch] peers {failed} failed (exit codes {[codes[i] for i in failed]})", flush=True)
        return 1
    return 0

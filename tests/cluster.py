"""Harness for loopback integration tests: an in-process master and real peer processes."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pccl

WORKER = str(Path(__file__).with_name("peer_worker.py"))


class Peer:
    def __init__(self, index: int, popen: subprocess.Popen) -> None:
        self.index = index
        self.popen = popen
        self.events: queue.Queue[dict] = queue.Queue()
        self.log: list[dict] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "text", "text": line.rstrip()}
            self.log.append(ev)
            self.events.put(ev)
        self.events.put({"event": "exit"})

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line.rstrip())

    def expect(self, event: str, timeout: float = 60.0, **match) -> dict:
        """Next event named ``event`` (skipping others); fail on crash, exit or timeout."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"peer {self.index}: no {event} within {timeout}s; log tail {self.log[-5:]}, "
                                     f"stderr {self.stderr[-10:]}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev["event"] == event and all(ev.get(k) == v for k, v in match.items()):
                return ev
            if ev["event"] in ("crash", "exit") and event not in ("crash", "exit"):
                raise AssertionError(f"peer {self.index} ended while waiting for {event}: {ev}; "
                                     f"stderr {self.stderr[-15:]}")

    def signal(self, sig: int) -> float:
        t = time.time()
        os.kill(self.popen.pid, sig)
        return t

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout)


class Cluster:
    def __init__(self, **config) -> None:
        self.config = pccl.Config.from_env(**config)
        self.master = pccl.Master("127.0.0.1", 0, config=self.config).start()
        self.env = dict(os.environ, PCCL_MASTER=self.master.address, PYTHONUNBUFFERED="1")
        for k, v in config.items():
            self.env["PCCL_" + k.upper()] = str(v)
        self.peers: list[Peer] = []

    def spawn(self, scenario: str, index: int, *args: str) -> Peer:
        popen = subprocess.Popen([sys.executable, WORKER, scenario, "--index", str(index), *args],
                                 env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 stdin=subprocess.DEVNULL)
        peer = Peer(index, popen)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for p in self.peers:
            if p.popen.poll() is None:
                try:
                    os.kill(p.popen.pid, signal.SIGCONT)
                except OSError:
                    pass
                p.popen.kill()
        for p in self.peers:
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.master.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MasterProcess:
    """``pccl master`` in its own process (so a test can SIGKILL it), on a fixed port."""

    def __init__(self, port: int, env: dict) -> None:
        self.port = port
        self.popen = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pccl.cli import main; sys.exit(main())", "master",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        assert self.popen.stdout is not None
        lines = []
        for _ in range(50):  # bounded: the process prints it or exits (EOF)
            lines.append(self.popen.stdout.readline())
            if "listening" in lines[-1] or not lines[-1]:
                break
        assert "listening" in lines[-1], f"the master did not start: {lines!r}"
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for _ in self.popen.stdout:
            pass

    def kill(self) -> float:
        t = time.time()
        self.popen.kill()
        self.popen.wait(10)
        return t

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


class ProcessCluster(Cluster):
    """Like :class:`Cluster`, with the master in a separate process that can be killed and restarted
    on the same port."""

    def __init__(self, **config) -> None:
        self.config = pccl.Config.from_env(**config)
        self.port = free_port()
        self.env = dict(os.environ, PCCL_MASTER=f"127.0.0.1:{self.port}", PYTHONUNBUFFERED="1")
        for k, v in config.items():
            self.env["PCCL_" + k.upper()] = str(v)
        self.peers = []
        self.masters = [MasterProcess(self.port, self.env)]

    def restart_master(self) -> None:
        self.masters.append(MasterProcess(self.port, self.env))

    def close(self) -> None:
        for mp in self.masters:
            mp.close()
        self.master = _NoMaster()
        super().close()


class _NoMaster:
    def close(self) -> None:
        pass

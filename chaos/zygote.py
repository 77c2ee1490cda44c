"""A zygote: one process that does the slow imports once, then forks chaos peers on request.

Why: on a loaded 2-core VM a fresh DiLoCo peer needs 40 s or more before it can join (python,
numpy, torch, and the optimizer stack torch imports lazily on the first ``AdamW``). With one
SIGKILL every 10 s, a kill-loop then measures process start-up, not pccl. A peer forked from a
warmed zygote shares those pages copy-on-write and starts at once, which is what a supervisor with
a preloaded interpreter does in production. ``--warm-spares`` hides the same cost differently (a
pre-started process per cell), but each spare's start-up still burns ~20 CPU-seconds beside the
workload; a fork costs milliseconds.

Protocol, JSON lines (no pickle); the zygote's stdin and stdout are pipes to the campaign:

* zygote → campaign, once: ``{"ev": "zygote_ready", "pid": Z, "seconds": S}``;
* campaign → zygote: ``{"req": K, "argv": [...], "env": {...}}`` (``chaos.workload`` arguments and
  environment variables to set in the child);
* zygote → campaign: ``{"ev": "forked", "req": K, "pid": P}``, then the child's own records (every
  ``chaos.workload`` record carries ``pid``), and when it ends ``{"ev": "reaped", "pid": P,
  "code": C}`` with C as ``Popen.returncode`` (negative: killed by that signal).

The zygote stays single-threaded, so forking it is safe. Each child starts a new session (so
``killpg(pid)`` reaches it), dies with the zygote (``PR_SET_PDEATHSIG``), reads /dev/null, keeps
the zygote's stderr (the peers' log) and shares its stdout: each record is one ``write`` of less
than ``PIPE_BUF`` bytes, which the kernel never interleaves. End of stdin (the campaign is gone or
closed it) makes the zygote SIGKILL its children and exit.

``Zygote`` is the campaign's side; ``Forked`` gives a forked peer the part of ``Popen``'s face the
campaign uses (``pid``, ``poll``, ``wait``, ``returncode``).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINE = 1 << 20  # a request longer than this is refused (the zygote exits)


# ---------------------------------------------------------------------------- the zygote process
def die_with_parent() -> None:
    """In a child: SIGKILL it when its parent dies, even by SIGKILL (Linux PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _warm(torch_too: bool) -> None:
    """Import what every peer imports, and with torch run one AdamW step on the demo model (torch
    imports its optimizer stack lazily there: ~24 s on a loaded VM)."""
    import numpy

    import pccl  # noqa: F401
    from chaos import workload  # noqa: F401

    if torch_too:
        import torch

        from pccl.demo_train import batch, encode_text, generate_text, loss_of, make_model
        from pccl.optim import DiLoCo  # noqa: F401

        torch.set_num_threads(1)
        model = make_model(32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        data = encode_text(generate_text(0, 2000))
        x, y = batch(data, numpy.random.default_rng(0), 2, 32)
        loss_of(model, x, y).backward()
        opt.step()


def _child(argv: list[str], env: dict[str, str]) -> int:
    os.setsid()
    die_with_parent()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.update(env)
    from chaos import workload

    return workload.main(argv)


def _fork(req: dict) -> int:
    argv, env = req.get("argv"), req.get("env", {})
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError(f"malformed request {req!r}")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = _child(argv, env)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then leave without running the zygote's code
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return 0  # unreachable


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _emit({"ev": "reaped", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def serve(torch_too: bool) -> int:
    t0 = time.monotonic()
    die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _warm(torch_too)
    _emit({"ev": "zygote_ready", "pid": os.getpid(), "seconds": round(time.monotonic() - t0, 2)})
    children: set[int] = set()
    pending = b""
    try:
        while True:
            ready, _, _ = select.select([0], [], [], 0.1)
            _reap(children)
            if not ready:
                continue
            data = os.read(0, 65536)
            if not data:
                return 0
            pending += data
            if len(pending) > MAX_LINE and b"\n" not in pending:
                raise ValueError("request line too long")
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                pid = _fork(req)
                children.add(pid)
                _emit({"ev": "forked", "req": req.get("req"), "pid": pid})
    finally:
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# ---------------------------------------------------------------------------- the campaign's side
class ZygoteError(RuntimeError):
    pass


class Forked:
    """A peer forked by the zygote, with the part of ``Popen``'s interface the campaign uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = threading.Event()

    def _ended(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"forked peer {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode


class Zygote:
    """Starts ``python -m chaos.zygote``, forks peers through it and routes its output.

    ``on_record(pid, record)`` is called (from a reader thread) for every child record.
    """

    def __init__(self, env: dict[str, str], stderr, on_record: Callable[[int, dict], None],
                 torch_too: bool, ready_timeout: float) -> None:
        cmd = [sys.executable, "-m", "chaos.zygote"] + (["--torch"] if torch_too else [])
        self._on_record = on_record
        self._lock = threading.Lock()
        self._replies: dict[int, Forked] = {}
        self._reply = threading.Condition(self._lock)
        self._children: dict[int, Forked] = {}
        self._reqs = 0
        self._ready = threading.Event()
        self._gone = False
        self.ready_seconds: float | None = None
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     cwd=REPO, start_new_session=True, preexec_fn=die_with_parent)
        threading.Thread(target=self._read, name="chaos-zygote-reader", daemon=True).start()
        if not self._ready.wait(ready_timeout) or self.ready_seconds is None:
            self.close()
            raise ZygoteError(f"the zygote did not get ready within {ready_timeout:.0f} s")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            kind = ev.get("ev")
            if kind == "zygote_ready":
                self.ready_seconds = float(ev.get("seconds", 0.0))
                self._ready.set()
            elif kind == "forked":  # registered here, so a "reaped" that follows at once is never lost
                child = Forked(int(ev["pid"]))
                with self._lock:
                    self._children[child.pid] = child
                    self._replies[int(ev["req"])] = child
                    self._reply.notify_all()
            elif kind == "reaped":
                with self._lock:
                    child = self._children.pop(int(ev["pid"]), None)
                if child is not None:
                    child._ended(int(ev["code"]))
            elif isinstance(ev.get("pid"), int):
                self._on_record(ev["pid"], ev)
        # the zygote is gone: so are its children (PR_SET_PDEATHSIG)
        with self._lock:
            self._gone = True
            children = list(self._children.values())
            self._reply.notify_all()
        self._ready.set()
        for child in children:
            child._ended(-signal.SIGKILL)

    def fork(self, argv: list[str], env: dict[str, str], timeout: float = 30.0) -> Forked:
        """Start one ``chaos.workload`` peer with these arguments and environment variables."""
        with self._lock:
            if self._gone:
                raise ZygoteError("the zygote has exited")
            self._reqs += 1
            req = self._reqs
        line = json.dumps({"req": req, "argv": argv, "env": env}) + "\n"
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise ZygoteError(f"the zygote does not take requests: {exc}") from None
        end = time.monotonic() + timeout
        with self._lock:
            while req not in self._replies:
                left = end - time.monotonic()
                if self._gone or left <= 0:
                    raise ZygoteError("the zygote did not fork the peer" + (" (it exited)" if self._gone else ""))
                self._reply.wait(left)
            return self._replies.pop(req)

    def close(self) -> None:
        """End the zygote (its children die with it) and wait for it."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5.0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return serve(torch_too="--torch" in args)


if __name__ == "__main__":
    sys.exit(main())

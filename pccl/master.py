"""The master process: a thin zmq shell around :class:`pccl.master_core.MasterCore`.

The shell owns one ROUTER socket and its monitor socket in one thread. It decodes frames, feeds
the core, and sends what the core returns. Transport disconnects (a killed peer's TCP connection
closing) reach the core at once: the monitor reports the file descriptor, and the shell maps file
descriptors to routing identities from each message's ``SRCFD`` property. The monitor is drained
before the ROUTER in every round so a reused descriptor is never blamed on its new owner.

Bounds on the ROUTER: a message over ``max_control_message`` bytes makes libzmq drop that
connection (the core then sees its disconnect); a connection that does not finish the ZMTP
greeting within ``connect_timeout`` is closed by libzmq (HANDSHAKE_IVL); each connection's queues
hold at most ``max_control_queue`` messages per direction (see ``bind``). With a secret, the core
refuses every connection that has not proved it (see ``pccl.master_core``).
"""
from __future__ import annotations

import logging
import threading
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from pccl.config import Config, resolve
from pccl.errors import InvalidUsage, ProtocolError
from pccl.master_core import MasterCore
from pccl.transports import messages as m

log = logging.getLogger(__name__)

_POLL_CAP = 0.1  # seconds; bounds how long close() waits for the loop to notice


class Master:
    """A pccl master.

    ``Master(host="127.0.0.1", port=0, config=None, secret=None)`` binds when started (port 0, the
    default, picks a free port; see ``address``; the CLI uses 48148). With ``secret`` (str or
    bytes; default: ``config.secret``, else ``PCCL_SECRET``) every peer must prove it by HMAC
    challenge-response; the others get AuthenticationFailed at ``connect()``.
    Use ``start()`` to serve in a background thread, ``serve_forever()`` to serve in the calling
    thread (the CLI), ``close()`` to stop; also a context manager.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: Config | None = None,
                 secret: str | bytes | None = None) -> None:
        """Raises InvalidUsage for an empty or non-text secret."""
        self.host = host
        self.port = port
        self.config = resolve(config, secret)
        self.core = MasterCore(self.config)
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._fd_of: dict[bytes, int] = {}
        self._conns_on_fd: dict[int, set[bytes]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        if self._sock is None:
            raise InvalidUsage("the master is not bound yet: call start() first")
        return f"{self.host}:{self.port}"

    def bind(self) -> None:
        if self._sock is not None:
            return
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_control_message)
        # Per-connection queues are bounded. Outbound: with ROUTER_MANDATORY off, a message to a
        # peer whose queue is full is dropped, never blocking the master (that peer stopped
        # reading; it misses messages and fails at its own deadlines). Inbound: a full queue makes libzmq stop reading
        # that TCP connection, so a flooding peer only stalls itself.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.max_control_queue)
        sock.setsockopt(zmq.RCVHWM, self.config.max_control_queue)
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.config.connect_timeout * 1000))
        self._mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as exc:
            sock.close(0)
            self._mon.close(0)
            self._ctx.term()
            self._sock = self._mon = self._ctx = None
            raise InvalidUsage(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._sock = sock
        log.info("master listening on %s:%d", self.host, self.port)

    def start(self) -> "Master":
        self.bind()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pccl-master", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``close()`` (or KeyboardInterrupt)."""
        self.bind()
        self._run()
        self._raise_crash()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and free the sockets; re-raises an error that crashed the serving thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._lock:
            for s in (self._mon, self._sock):
                if s is not None:
                    s.close(0)
            if self._ctx is not None:
                self._ctx.term()
            self._sock = self._mon = self._ctx = None
        self._raise_crash()

    def _raise_crash(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("the pccl master loop crashed") from err

    def __enter__(self) -> "Master":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> str:
        self._raise_crash()
        return self.core.status_text()

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        assert self._sock is not None and self._mon is not None
        poller = zmq.Poller()
        poller.register(self._mon, zmq.POLLIN)
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait = min(max(self.core.next_deadline() - now, 0.0), _POLL_CAP)
                ready = dict(poller.poll(int(wait * 1000) + 1))
                if self._mon in ready:
                    self._drain_monitor()
                if self._sock in ready:
                    self._drain_router()
                self._execute(self.core.tick(time.monotonic()))
        except BaseException as exc:  # a bug in the master: keep it visible to close()/serve_forever()
            if not self._stop.is_set():
                log.exception("master loop crashed")
                self._error = exc
        finally:
            self._stop.set()

    def _drain_monitor(self) -> None:
        assert self._mon is not None
        while True:
            try:
                frames = self._mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(frames)
            except Exception:
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fd = event["value"]
                for conn in self._conns_on_fd.pop(fd, set()):
                    self._fd_of.pop(conn, None)
                    self._execute(self.core.disconnected(conn, time.monotonic()))

    def _drain_router(self) -> None:
        assert self._sock is not None
        for _ in range(1000):  # bounded batch, then let tick() run
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            conn = frames[0].bytes
            try:
                fd = frames[-1].get(zmq.SRCFD)
                if self._fd_of.get(conn) != fd:
                    self._fd_of[conn] = fd
                    self._conns_on_fd.setdefault(fd, set()).add(conn)
            except zmq.ZMQError:
                pass
            now = time.monotonic()
            if len(frames) != 2:
                self._execute(self.core.protocol_error(conn, f"expected 1 frame, got {len(frames) - 1}", now))
                continue
            try:
                msg = m.decode(frames[1].bytes, self.config.max_control_message)
            except ProtocolError as exc:
                self._execute(self.core.protocol_error(conn, str(exc), now))
                continue
            self._execute(self.core.handle(conn, msg, now))

    def _execute(self, actions: list) -> None:
        assert self._sock is not None
        for a in actions:
            try:
                self._sock.send_multipart([a.conn, m.encode(a.msg)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # peer gone or its queue full: liveness handles it
                log.debug("send to %r failed: %s", a.conn, exc)

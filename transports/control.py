"""The peer's control channel: one DEALER socket to the master at a time, owned by one thread.

How it works
1. ``send()`` (any thread) encodes a message and pushes it, stamped with the current session
   number, through an inproc PUSH socket guarded by a lock; the owner thread polls that pipe and
   the DEALER and forwards messages of the current session only (a message meant for a master
   that is gone is dropped, never delivered to its successor).
2. Every decoded inbound message is handed to ``on_message`` in the owner thread (which must not
   block). Any inbound message proves the master alive; a heartbeat goes out when nothing else
   was sent for ``heartbeat_interval``.
3. Sessions (``pccl.transports.reconnect`` decides; this shell only executes): zmq's automatic
   reconnection is off, so every connection is opened here and carries exactly one registration
   (``hello()`` builds the ``Register``). A socket monitor reports a closed or refused connection
   at once; a master silent for ``master_timeout`` counts as lost too (time this process was
   frozen, seen as a poll returning over ``STALL_SECONDS`` late, does not count). Everything
   the master sent before a connection closed is read first. A lost session calls
   ``on_lost(MasterLost)`` and re-registers with capped exponential backoff for
   ``master_reconnect_timeout`` seconds.
4. Final failures call ``on_failure`` once and end the thread: MasterUnreachable (no session
   within the window), Kicked (the master removed this peer, or refused its registration),
   AuthenticationFailed, ProtocolError (undecodable input). ``close()`` is idempotent and bounded.
5. With a secret (``config.secret``) every connection first authenticates (``transports.auth``):
   it sends ``AuthHello``, checks the master's proof in ``AuthChallenge``, answers ``AuthProof``
   and only then sends the registration; nothing else goes out before (heartbeats and forwarded
   messages wait for a registered session). A master that fails to prove the secret, or answers
   ``AuthFailed``, fails the channel with AuthenticationFailed.
6. Queues are bounded: ``max_control_queue`` messages per direction on the DEALER; a ``send`` that
   finds the pipe full waits at most ``master_timeout`` and raises MasterUnreachable.
"""
from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from pccl.config import Config
from pccl.errors import AuthenticationFailed, Kicked, MasterLost, MasterUnreachable, PcclError, ProtocolError
from pccl.transports import auth
from pccl.transports import messages as m
from pccl.transports import reconnect as rc

log = logging.getLogger(__name__)

_IDS = itertools.count()
_SESSION = struct.Struct("<Q")
STALL_SECONDS = 1.0  # a poll that returns this much later than asked means this process did not run


class ControlChannel:
    def __init__(self, master: str, config: Config, hello: Callable[[], object],
                 on_message: Callable[[object], None], on_failure: Callable[[PcclError], None],
                 on_lost: Callable[[MasterLost], None] | None = None) -> None:
        """``hello()`` builds the registration sent first on every connection (heartbeats after it)."""
        self.master = master
        self.config = config
        self._hello = hello
        self._on_message = on_message
        self._on_failure = on_failure
        self._on_lost = on_lost
        self._ctx = zmq.Context()
        pipe = f"inproc://pccl-control-{id(self)}-{next(_IDS)}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(pipe)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDTIMEO, int(config.master_timeout * 1000))
        self._push.connect(pipe)
        self._push_lock = threading.Lock()
        self._closed = threading.Event()
        self._final: bytes | None = None
        self.failure: PcclError | None = None
        self._dealer: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._conn_no = 0  # connections opened so far; a session is named by its connection
        self._auth: auth.Initiator | None = None  # the current connection's pending authentication
        self.session = 0  # connection number of the registered session (0: none)
        now = time.monotonic()
        self.last_heard = now
        self._last_sent = now
        cfg = config
        self._core = rc.Session(now, window=cfg.master_reconnect_timeout, base=cfg.master_reconnect_backoff,
                                cap=cfg.master_reconnect_backoff_max, attempt_timeout=cfg.master_timeout,
                                silence=cfg.master_timeout, first_window=cfg.master_timeout)
        self._open()
        self._thread = threading.Thread(target=self._run, name="pccl-control", daemon=True)
        self._thread.start()

    @property
    def phase(self) -> rc.Phase:
        return self._core.phase

    def send(self, msg: object) -> None:
        """Send on the current session. Raises the final failure, or MasterLost while the session
        is being re-established."""
        if self.failure is not None:
            raise self.failure
        session = self.session
        if session == 0 or self._core.phase is not rc.Phase.CONNECTED:
            raise MasterLost(f"the control connection to the master at {self.master} is being re-established")
        data = m.encode(msg)
        with self._push_lock:
            if self._closed.is_set():
                raise MasterUnreachable("the control channel is closed")
            try:
                self._push.send_multipart([_SESSION.pack(session), data])
            except zmq.Again:
                raise MasterUnreachable(f"the control queue to the master at {self.master} stayed full "
                                        f"for master_timeout ({self.config.master_timeout}s)") from None

    # ------------------------------------------------------------------ connections
    def _open(self) -> None:
        """A fresh connection (new routing identity) with the registration queued on it."""
        self._conn_no += 1
        d = self._ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.MAXMSGSIZE, self.config.max_control_message)
        d.setsockopt(zmq.SNDHWM, self.config.max_control_queue)
        d.setsockopt(zmq.RCVHWM, self.config.max_control_queue)
        d.setsockopt(zmq.HANDSHAKE_IVL, int(self.config.connect_timeout * 1000))
        d.setsockopt(zmq.RECONNECT_IVL, -1)  # one connection per session: never reconnect silently
        self._monitor = d.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        d.connect(f"tcp://{self.master}")
        if self.config.secret is not None:
            self._auth = auth.Initiator(self.config.secret, auth.CONTROL)
            d.send(m.encode(m.AuthHello(nonce=self._auth.nonce)), zmq.NOBLOCK)
        else:
            self._auth = None
            d.send(m.encode(self._hello()), zmq.NOBLOCK)
        self._dealer = d
        self._last_sent = time.monotonic()

    def _drop(self, linger: int = 0) -> None:
        if self._dealer is not None:
            try:
                self._dealer.disable_monitor()
            except zmq.ZMQError:
                pass
            self._dealer.close(linger=linger)
        if self._monitor is not None:
            self._monitor.close(0)
        self._dealer = self._monitor = None

    def _execute(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, rc.Drop):
                self._drop()
            elif isinstance(a, rc.Attempt):
                log.info("re-registering with the master at %s (attempt %d)", self.master, a.number)
                self._open()
            elif isinstance(a, rc.Lost):
                self.session = 0
                err = MasterLost(f"lost the control connection to the master at {self.master} ({a.reason}); "
                                 f"re-registering for up to {a.window:g}s: call update_topology() and retry")
                log.warning("%s", err)
                if self._on_lost is not None:
                    self._on_lost(err)
            elif isinstance(a, rc.Fail):
                self.session = 0
                if a.kind == "kicked":
                    raise Kicked(f"the master removed this peer: {a.reason}")
                if a.kind == "refused":
                    raise Kicked(f"the master at {self.master} refused this peer's registration: {a.reason}; "
                                 "create a new Communicator")
                raise MasterUnreachable(f"the master at {self.master} is unreachable: {a.reason}")

    def _fail(self, err: PcclError) -> None:
        if self.failure is None:
            self.failure = err
            log.warning("control channel failed: %s", err)
            self._on_failure(err)

    # ------------------------------------------------------------------ the owner thread
    def _read_dealer(self) -> None:
        """Hand every queued inbound message to the core and the callback."""
        cfg = self.config
        for _ in range(10000):
            if self._dealer is None:
                return
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            self._core.heard(now)
            self.last_heard = now
            if len(frames) != 1:
                raise ProtocolError("the master sent a multi-frame message")
            msg = m.decode(frames[0], cfg.max_control_message)
            if self._authenticated(msg):
                continue
            if isinstance(msg, m.Kicked):
                self._execute(self._core.kicked(now, msg.reason))
                return
            if isinstance(msg, m.Registered):
                self._core.registered(now)
                self.session = self._conn_no
            if self._core.phase is rc.Phase.CONNECTED:
                self._on_message(msg)

    def _authenticated(self, msg: object) -> bool:
        """Handle an authentication message; True if ``msg`` was one (raises AuthenticationFailed)."""
        if isinstance(msg, m.AuthFailed):
            raise AuthenticationFailed(f"authentication with the master failed: {msg.reason}")
        if not isinstance(msg, m.AuthChallenge):
            if self._auth is not None:  # mutual: nothing counts before the master proved the secret
                raise AuthenticationFailed(f"authentication with the master failed: it answered with "
                                           f"{type(msg).__name__} without proving the shared secret")
            return False
        if self._auth is None or self._dealer is None:
            raise ProtocolError("the master sent an unexpected authentication challenge")
        try:
            mine = self._auth.answer(msg.nonce, msg.proof)
        except AuthenticationFailed:
            raise AuthenticationFailed(
                "authentication with the master failed: wrong secret (the master could not prove it "
                "knows this peer's secret; use the same secret= / PCCL_SECRET everywhere)") from None
        self._auth = None
        self._dealer.send(m.encode(m.AuthProof(proof=mine)), zmq.NOBLOCK)
        self._dealer.send(m.encode(self._hello()), zmq.NOBLOCK)
        self._last_sent = time.monotonic()
        return True

    def _read_monitor(self) -> None:
        while self._monitor is not None:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(frames)["event"]
            except Exception:  # noqa: BLE001 - a malformed monitor frame says nothing
                continue
            if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._read_dealer()  # what the master sent before the connection closed counts
                if self._monitor is None:
                    return
                why = "the connection closed" if event == zmq.EVENT_DISCONNECTED else "the connection was refused"
                self._execute(self._core.connection_lost(time.monotonic(), why))

    def _forward(self) -> None:
        for _ in range(10000):
            try:
                session, data = self._pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            if self._dealer is None or _SESSION.unpack(session)[0] != self.session or self.session == 0:
                continue  # meant for a session that is gone
            try:
                self._dealer.send(data, zmq.NOBLOCK)
                self._last_sent = time.monotonic()
            except zmq.Again:
                pass  # the connection is going away; the monitor reports it

    def _run(self) -> None:
        cfg = self.config
        poller, polled = zmq.Poller(), (None, None)
        try:
            while not self._closed.is_set():
                if polled != (self._dealer, self._monitor):  # a new connection: poll its sockets
                    poller, polled = zmq.Poller(), (self._dealer, self._monitor)
                    for sock in (self._pull, *polled):
                        if sock is not None:
                            poller.register(sock, zmq.POLLIN)
                now = time.monotonic()
                wait = min(self._core.next_deadline() - now, 0.2)
                if self._core.phase is rc.Phase.CONNECTED:
                    wait = min(wait, cfg.heartbeat_interval - (now - self._last_sent))
                wait_ms = max(int(wait * 1000), 0) + 1
                ready = dict(poller.poll(wait_ms))
                late = time.monotonic() - now - wait_ms / 1000
                if late > STALL_SECONDS:  # this process was frozen or starved, not the master silent
                    self._core.stalled(time.monotonic(), late)
                # Only the sockets the poll found readable: a receive that finds nothing raises
                # zmq.Again, and that costs more than the poll (several wake-ups per collective).
                if self._dealer in ready:
                    self._read_dealer()
                if self._monitor in ready:
                    self._read_monitor()
                if self._pull in ready:
                    self._forward()
                now = time.monotonic()
                if self._core.phase is rc.Phase.CONNECTED and now - self._core.last_heard > self._core.silence:
                    self._read_dealer()  # a peer that was frozen reads what waited for it first
                self._execute(self._core.tick(time.monotonic()))
                if self._core.phase is rc.Phase.CONNECTED and self._dealer is not None and \
                        time.monotonic() - self._last_sent >= cfg.heartbeat_interval:
                    try:
                        self._dealer.send(m.encode(m.Heartbeat()), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    self._last_sent = time.monotonic()
        except PcclError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: surface it to the caller instead of hanging
            log.exception("control thread crashed")
            self._fail(ProtocolError(f"control thread crashed: {type(exc).__name__}: {exc}"))
        finally:
            if self._final is not None and self._dealer is not None and self.session:
                try:
                    self._dealer.send(self._final, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._drop(linger=200 if self._final is not None else 0)
            self._pull.close(0)

    def close(self, final: object | None = None, timeout: float = 2.0) -> None:
        """Send ``final`` (best effort, e.g. Leave), stop the thread and free the sockets."""
        with self._push_lock:
            if self._closed.is_set():
                return
            if final is not None and self.failure is None:
                self._final = m.encode(final)
            self._closed.set()
            self._push.close(0)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._ctx.term()

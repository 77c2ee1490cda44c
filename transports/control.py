"""The peer's control channel: one DEALER socket to the master, owned by one thread.

How it works
1. ``send()`` (any thread) encodes a message and pushes it through an inproc PUSH socket guarded
   by a lock; the owner thread polls that pipe and the DEALER and forwards.
2. Every decoded inbound message is handed to ``on_message`` in the owner thread (which must not
   block). Any inbound message proves the master alive; a heartbeat goes out when nothing else
   was sent for ``heartbeat_interval``.
3. When the master stays silent past ``master_timeout`` or sends something undecodable, the
   channel fails once: ``on_failure`` receives a MasterUnreachable / ProtocolError and the thread
   ends. ``close()`` is idempotent and bounded.
4. With a secret (``config.secret``) the channel first authenticates (``transports.auth``): it
   sends ``AuthHello``, checks the master's proof in ``AuthChallenge``, answers ``AuthProof`` and
   only then sends ``first``; until then nothing else goes out (no heartbeats, the pipe waits).
   A master that fails to prove the secret, or answers ``AuthFailed``, fails the channel with
   AuthenticationFailed.
5. Queues are bounded: ``max_control_queue`` messages per direction on the DEALER. A send that
   finds the queue full waits at most ``master_timeout`` and then fails the channel with
   MasterUnreachable (the master stopped reading); inbound, libzmq stops reading the socket.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable

import zmq

from pccl.config import Config
from pccl.errors import AuthenticationFailed, MasterUnreachable, PcclError, ProtocolError
from pccl.transports import auth
from pccl.transports import messages as m

log = logging.getLogger(__name__)

_IDS = itertools.count()


class ControlChannel:
    def __init__(self, master: str, config: Config, first: object, on_message: Callable[[object], None],
                 on_failure: Callable[[PcclError], None]) -> None:
        """``first`` (the registration) is sent before anything else, heartbeats included."""
        self.master = master
        self.config = config
        self._on_message = on_message
        self._on_failure = on_failure
        self._ctx = zmq.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.setsockopt(zmq.MAXMSGSIZE, config.max_control_message)
        self._dealer.setsockopt(zmq.SNDHWM, config.max_control_queue)
        self._dealer.setsockopt(zmq.RCVHWM, config.max_control_queue)
        self._dealer.setsockopt(zmq.SNDTIMEO, int(config.master_timeout * 1000))
        self._dealer.setsockopt(zmq.HANDSHAKE_IVL, int(config.connect_timeout * 1000))
        self._dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        self._dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._dealer.connect(f"tcp://{master}")
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
        self.last_heard = time.monotonic()
        self._first = m.encode(first)
        self._auth = auth.Initiator(config.secret, auth.CONTROL) if config.secret is not None else None
        self._dealer.send(m.encode(m.AuthHello(nonce=self._auth.nonce)) if self._auth is not None else self._first)
        self._last_sent = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="pccl-control", daemon=True)
        self._thread.start()

    def send(self, msg: object) -> None:
        if self.failure is not None:
            raise self.failure
        data = m.encode(msg)
        with self._push_lock:
            if self._closed.is_set():
                raise MasterUnreachable("the control channel is closed")
            try:
                self._push.send(data)
            except zmq.Again:
                raise MasterUnreachable(f"the control queue to the master at {self.master} stayed full "
                                        f"for master_timeout ({self.config.master_timeout}s)") from None

    def _fail(self, err: PcclError) -> None:
        if self.failure is None:
            self.failure = err
            log.warning("control channel failed: %s", err)
            self._on_failure(err)

    def _authenticated(self, msg: object) -> bool:
        """Handle an authentication message; True if ``msg`` was one (raises AuthenticationFailed)."""
        if isinstance(msg, m.AuthFailed):
            raise AuthenticationFailed(f"authentication with the master failed: {msg.reason}")
        if not isinstance(msg, m.AuthChallenge):
            if self._auth is not None:  # mutual: nothing counts before the master proved the secret
                raise AuthenticationFailed(f"authentication with the master failed: it answered with "
                                           f"{type(msg).__name__} without proving the shared secret")
            return False
        if self._auth is None:
            raise ProtocolError("the master sent an unexpected authentication challenge")
        try:
            mine = self._auth.answer(msg.nonce, msg.proof)
        except AuthenticationFailed:
            raise AuthenticationFailed(
                "authentication with the master failed: wrong secret (the master could not prove it "
                "knows this peer's secret; use the same secret= / PCCL_SECRET everywhere)") from None
        self._auth = None
        self._poller.register(self._pull, zmq.POLLIN)  # the pipe flows once authenticated
        self._dealer.send(m.encode(m.AuthProof(proof=mine)))
        self._dealer.send(self._first)
        self._last_sent = time.monotonic()
        return True

    def _run(self) -> None:
        poller = self._poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        if self._auth is None:
            poller.register(self._pull, zmq.POLLIN)
        cfg = self.config
        try:
            while not self._closed.is_set():
                now = time.monotonic()
                beat = cfg.heartbeat_interval - (now - self._last_sent) if self._auth is None else 0.2
                wait = min(beat, cfg.master_timeout - (now - self.last_heard), 0.2)
                ready = dict(poller.poll(max(int(wait * 1000), 0) + 1))
                if self._pull in ready:
                    for _ in range(10000):
                        try:
                            data = self._pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dealer.send(data)
                        self._last_sent = time.monotonic()
                if self._dealer in ready:
                    for _ in range(10000):
                        try:
                            frames = self._dealer.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.last_heard = time.monotonic()
                        if len(frames) != 1:
                            raise ProtocolError("the master sent a multi-frame message")
                        msg = m.decode(frames[0], cfg.max_control_message)
                        if not self._authenticated(msg):
                            self._on_message(msg)
                now = time.monotonic()
                if now - self.last_heard > cfg.master_timeout:
                    raise MasterUnreachable(
                        f"no message from the master at {self.master} for {now - self.last_heard:.1f}s "
                        f"(master_timeout {cfg.master_timeout}s)")
                if now - self._last_sent >= cfg.heartbeat_interval and self._auth is None:
                    self._dealer.send(m.encode(m.Heartbeat()))
                    self._last_sent = now
        except zmq.Again:
            self._fail(MasterUnreachable(f"the control queue to the master at {self.master} stayed full for "
                                         f"master_timeout ({cfg.master_timeout}s)"))
        except PcclError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: surface it to the caller instead of hanging
            log.exception("control thread crashed")
            self._fail(ProtocolError(f"control thread crashed: {type(exc).__name__}: {exc}"))
        finally:
            if self._final is not None:
                try:
                    self._dealer.send(self._final, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._dealer.close(linger=200 if self._final is not None else 0)
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

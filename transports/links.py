"""TCP data links: a listener that parks handshaken connections, and connections that each own a
worker thread running queued jobs in FIFO order.

How it works
1. Every peer listens on one TCP port. An accepted connection must complete its handshake within
   ``connect_timeout`` in total (a deadline, not a per-read timeout, so a client trickling bytes
   is cut off too); the listener answers with an ack naming its own peer id and parks the
   socket under (revision, connector id, index) until the communicator claims it. At most
   ``max_half_open`` connections may be in handshake, parked or being served; more are closed at
   once. With a shared secret (``Config.secret``) both sides first prove it by HMAC
   challenge-response (``transports.auth``); a side without it, or with another, is refused
   with a reason code and the connection closed. Connections of another kind (shared-state
   transfer, bandwidth probe) are handed to the handler registered for that kind, on the
   handshake's thread, and closed when it returns.
2. The connector opens K sockets per directed link (one direction each: a socket only ever sends
   or only ever receives), sends the handshake and checks the ack's peer id. Both ends then set
   TCP_NODELAY, and, when the two ends are on one host (:func:`same_host`), a send buffer of
   ``Config.local_send_buffer`` bytes instead of the kernel's autotuned one.
3. Each :class:`Connection` owns a worker thread. Collectives submit one *lane program* per
   connection; programs run in submission order, which every peer keeps identical (they are
   submitted in the master's commence order), so frames of consecutive ops never interleave.
4. ``abort()`` shuts a socket down, which wakes any thread blocked in send or receive on it. A
   broken connection stays broken: links are rebuilt at the next topology update.
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from typing import Callable

import numpy as np

from pccl.config import Config
from pccl.errors import AuthenticationFailed, InvalidUsage, PcclError, PcclTimeout, PeerFailure, ProtocolError
from pccl.transports import auth, framing

log = logging.getLogger(__name__)

Program = Callable[["Connection"], None]


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOF raises PeerFailure."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerFailure("connection closed by the remote peer")
        got += k


def _recv_by(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Receive exactly ``n`` bytes before ``deadline`` (each read gets only the time left, so a
    trickle of bytes cannot stretch the wait). Raises PcclTimeout, PeerFailure (EOF) or OSError."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PcclTimeout("the handshake did not complete within connect_timeout")
        sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerFailure("connection closed by the remote peer")
        got += k
    return bytes(buf)


def _send_by(sock: socket.socket, data: bytes, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PcclTimeout("the handshake did not complete within connect_timeout")
    sock.settimeout(left)
    sock.sendall(data)


def _tune(sock: socket.socket, config: Config) -> None:
    """Options of an established data connection: no Nagle delay; between two addresses of one
    host, a fixed send buffer of ``config.local_send_buffer`` bytes (see :func:`same_host`)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if config.local_send_buffer and same_host(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.local_send_buffer)


def same_host(sock: socket.socket) -> bool:
    """True if both ends of the connected ``sock`` are on this machine: the peer is a loopback
    address, or the same address as this end (the kernel then routes it through loopback too).
    There the path's bandwidth-delay product is a few KiB, so a small send buffer costs no
    throughput; on a real network it would, and the kernel's autotuning is left alone."""
    try:
        local, peer = sock.getsockname()[0], sock.getpeername()[0]
        return local == peer or ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except (OSError, ValueError, IndexError):
        return False


class Listener:
    """Accepts data connections and parks them until claimed."""

    def __init__(self, host: str, port: int, config: Config) -> None:
        self.config = config
        self.peer_id: int | None = None
        self._sock = socket.create_server((host, port), backlog=128)
        self.host, self.port = self._sock.getsockname()[:2]
        self._cond = threading.Condition()
        self._parked: dict[tuple[int, int, int], tuple[socket.socket, float]] = {}
        self._half_open = 0
        self._closed = False
        self._handlers: dict[int, Callable[[socket.socket, framing.Handshake], None]] = {}
        self._thread = threading.Thread(target=self._accept_loop, name="pccl-listener", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.2)
        while not self._closed:
            try:
                conn, _addr = self._sock.accept()
            except socket.timeout:
                self._expire()
                continue
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)
                continue
            with self._cond:
                over = self._half_open + len(self._parked) >= self.config.max_half_open
                if over:
                    self._purge_dead_locked()
                    over = self._half_open + len(self._parked) >= self.config.max_half_open
                if not over:
                    self._half_open += 1
            if over:
                log.warning("too many half-open data connections; dropping one")
                conn.close()
                continue
            threading.Thread(target=self._handshake, args=(conn, _addr), name="pccl-handshake",
                             daemon=True).start()

    def _handshake(self, conn: socket.socket, addr: object = None) -> None:
        parked = False
        deadline = time.monotonic() + self.config.connect_timeout
        try:
            raw = _recv_by(conn, framing.HANDSHAKE_SIZE, deadline)
            hs = framing.decode_handshake(raw)
            secret = self.config.secret
            if hs.auth != (secret is not None):
                reason = framing.NAK_NO_SECRET if hs.auth else framing.NAK_NEED_SECRET
                _send_by(conn, framing.encode_nak(reason), deadline)
                raise AuthenticationFailed("the connector " + (
                    "offered a secret and this peer has none" if hs.auth else "did not prove the shared secret"))
            nonce = _recv_by(conn, auth.NONCE_SIZE, deadline) if hs.auth else b""
            self._await_id(deadline)
            handler = self._handlers.get(hs.kind)
            if hs.kind != framing.KIND_LINK and handler is None:
                raise ProtocolError(f"this peer serves no connections of kind {hs.kind}")
            if secret is not None:
                header = framing.encode_challenge(self.peer_id)
                resp = auth.Responder(secret, auth.DATA, nonce, raw, header)
                _send_by(conn, header + resp.nonce + resp.proof, deadline)
                if not resp.verify(_recv_by(conn, auth.PROOF_SIZE, deadline)):
                    _send_by(conn, framing.encode_nak(framing.NAK_BAD_PROOF), deadline)
                    raise AuthenticationFailed("the connector's proof was wrong (a different secret)")
            _send_by(conn, framing.encode_ack(self.peer_id), deadline)
            _tune(conn, self.config)
            if handler is not None:
                handler(conn, hs)  # bounded by the handler's own socket timeouts
                return
            conn.settimeout(None)
            with self._cond:
                key = (hs.revision, hs.peer_id, hs.index)
                old = self._parked.pop(key, None)
                if old is not None:
                    old[0].close()
                self._parked[key] = (conn, time.monotonic())
                parked = True
                self._cond.notify_all()
        except AuthenticationFailed as exc:
            log.warning("refused a data connection from %s: %s", addr, exc)
        except (OSError, PcclError) as exc:
            log.info("dropped a data connection during handshake: %s", exc)
        finally:
            with self._cond:
                self._half_open -= 1
            if not parked:
                conn.close()

    def assign(self, peer_id: int) -> None:
        """Set this peer's id (from the master's Registered) and wake handshakes waiting for it."""
        with self._cond:
            self.peer_id = peer_id
            self._cond.notify_all()

    def _await_id(self, deadline: float) -> None:
        """Wait until this peer has an id. A peer that the master just admitted can be dialled
        by a neighbour that read the new topology before this peer's control thread read its own
        Registered message; refusing that connection would fail the neighbour's link building."""
        with self._cond:
            while self.peer_id is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ProtocolError("this peer has no id yet")
                self._cond.wait(min(left, 0.2))

    def _purge_dead_locked(self) -> None:
        """Close parked connections whose connector already hung up (EOF pending), so slots held
        by vanished connectors are freed before a new connection is refused."""
        for key, (conn, _) in list(self._parked.items()):
            try:
                dead = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                dead = False
            except OSError:
                dead = True
            if dead:
                self._parked.pop(key)
                conn.close()

    def _expire(self) -> None:
        """Close parked connections nobody claimed (stale revisions, slow or bogus connectors)."""
        limit = time.monotonic() - max(self.config.topology_timeout, 30.0)
        with self._cond:
            for key in [k for k, (_, t) in self._parked.items() if t < limit]:
                self._parked.pop(key)[0].close()

    def handle(self, kind: int, handler: Callable[[socket.socket, framing.Handshake], None]) -> None:
        """Serve connections of ``kind`` with ``handler(sock, handshake)`` (closed when it returns)."""
        self._handlers[kind] = handler

    def drop_older(self, revision: int) -> None:
        with self._cond:
            for key in [k for k in self._parked if k[0] < revision]:
                self._parked.pop(key)[0].close()

    def claim(self, revision: int, peer_id: int, index: int, deadline: float,
              abandoned: Callable[[], bool] = lambda: False) -> socket.socket:
        """Wait for connection ``index`` of ``peer_id`` at ``revision``; give up at the deadline or
        as soon as ``abandoned()`` says that peer is gone (call ``wake()`` when that changes)."""
        key = (revision, peer_id, index)
        with self._cond:
            while key not in self._parked:
                left = deadline - time.monotonic()
                if self._closed:
                    raise PeerFailure("the data listener is closed")
                if abandoned():
                    raise PeerFailure(f"peer {peer_id} died before opening its data connections")
                if left <= 0:
                    raise PeerFailure(f"peer {peer_id} did not open data connection {index} in time")
                self._cond.wait(min(left, 0.2))
            return self._parked.pop(key)[0]

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        self._thread.join(2.0)
        with self._cond:
            for conn, _ in self._parked.values():
                conn.close()
            self._parked.clear()
            self._cond.notify_all()


def connect(host: str, port: int, my_id: int, expect_id: int, revision: int, index: int,
            config: Config, kind: int = framing.KIND_LINK) -> socket.socket:
    """Open one outgoing data connection and complete the handshake, ``connect_timeout`` in total.

    With ``config.secret`` both sides prove it first. Raises PeerFailure (unreachable, closed,
    timed out, malformed answer, another peer at that address) or AuthenticationFailed (the
    listener refused this side's secret or lack of one, or did not prove the secret itself).
    """
    deadline = time.monotonic() + config.connect_timeout
    try:
        sock = socket.create_connection((host, port), timeout=config.connect_timeout)
    except OSError as exc:
        raise PeerFailure(f"cannot reach peer {expect_id} at {host}:{port}: {exc}") from exc
    try:
        secret = config.secret
        raw = framing.encode_handshake(framing.Handshake(my_id, revision, index, kind, secret is not None))
        initiator = auth.Initiator(secret, auth.DATA) if secret is not None else None
        _send_by(sock, raw + (initiator.nonce if initiator is not None else b""), deadline)
        head = _recv_by(sock, framing.ACK_SIZE, deadline)
        reply = framing.decode_reply(head)
        if initiator is not None and reply.kind == "ack":
            raise AuthenticationFailed(f"data connection to peer {expect_id} at {host}:{port}: it accepted "
                                       "without proving the shared secret")
        if reply.kind == "challenge" and initiator is not None:
            rest = _recv_by(sock, auth.NONCE_SIZE + auth.PROOF_SIZE, deadline)
            try:
                mine = initiator.answer(rest[:auth.NONCE_SIZE], rest[auth.NONCE_SIZE:], raw, head)
            except AuthenticationFailed:
                raise AuthenticationFailed(f"data connection to peer {expect_id} at {host}:{port}: it did not "
                                           "prove the shared secret (wrong secret on one side)") from None
            _send_by(sock, mine, deadline)
            reply = framing.decode_reply(_recv_by(sock, framing.ACK_SIZE, deadline))
        if reply.kind == "nak":
            raise AuthenticationFailed(f"data connection to peer {expect_id} at {host}:{port} refused: "
                                       f"{framing.NAK_REASONS[reply.value]}")
        if reply.kind != "ack":
            raise ProtocolError(f"unexpected handshake reply ({reply.kind})")
        if reply.value != expect_id:
            raise PeerFailure(f"{host}:{port} is peer {reply.value}, not peer {expect_id}")
        sock.settimeout(None)
        _tune(sock, config)
        return sock
    except (OSError, ProtocolError, PcclTimeout) as exc:
        sock.close()
        raise PeerFailure(f"handshake with peer {expect_id} failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise


class Connection:
    """One socket and the worker thread that runs lane programs on it, one after another."""

    def __init__(self, sock: socket.socket | None, name: str,
                 opener: Callable[[], socket.socket] | None = None) -> None:
        """``sock`` None: the worker thread opens it with ``opener()`` before the first program
        (a lazily opened mesh connection); if that fails, every program fails with its error."""
        self.sock = sock  # type: ignore[assignment]
        self.name = name
        self.broken: BaseException | None = None
        self._opener = opener
        self._aborted = False
        self._open_lock = threading.Lock()
        self._scratch = np.empty(0, dtype=np.uint8)
        self._queue: queue.SimpleQueue[tuple[Program, Callable[[BaseException | None], None]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name=f"pccl-lane-{name}", daemon=True)
        self._thread.start()

    def scratch(self, nbytes: int) -> np.ndarray:
        """A byte buffer of at least ``nbytes`` reused across programs (only the worker uses it)."""
        if self._scratch.size < nbytes:
            self._scratch = np.empty(nbytes, dtype=np.uint8)
        return self._scratch[:nbytes]

    def submit(self, program: Program, done: Callable[[BaseException | None], None]) -> None:
        """Queue ``program``; ``done(error_or_None)`` is called from the worker when it ends."""
        self._queue.put((program, done))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            program, done = item
            if self.sock is None and self.broken is None:
                self._open()
            err: BaseException | None = self.broken
            if err is None:
                try:
                    program(self)
                except BaseException as exc:  # reported to the op; the connection is unusable now
                    err = exc if isinstance(exc, (PeerFailure, ProtocolError, PcclTimeout, InvalidUsage)) else (
                        PeerFailure(f"data connection {self.name} failed: {exc}"))
                    self.broken = err
                    self.abort()
            elif not isinstance(err, PeerFailure):
                err = PeerFailure(f"data connection {self.name} is broken: {err}")
            try:
                done(err)
            except Exception:  # a bug in a callback must not kill the lane
                log.exception("lane completion callback failed")

    @property
    def aborted(self) -> bool:
        return self._aborted

    def _open(self) -> None:
        assert self._opener is not None
        try:
            sock = self._opener()
        except BaseException as exc:
            self.broken = exc if isinstance(exc, PeerFailure) else PeerFailure(
                f"opening data connection {self.name} failed: {exc}")
            return
        with self._open_lock:
            self.sock = sock
            aborted = self._aborted
        if aborted:
            self.broken = PeerFailure(f"data connection {self.name} was aborted")
            self.abort()

    def abort(self) -> None:
        with self._open_lock:
            self._aborted = True
            sock = self.sock
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self, timeout: float = 2.0) -> None:
        self.abort()
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self.sock is not None:
            self.sock.close()


class LinkSet:
    """The data links of one world revision: K connections to the right neighbour (send only)
    and K from the left neighbour (receive only)."""

    def __init__(self, revision: int, right: int | None, left: int | None,
                 send: list[Connection], recv: list[Connection]) -> None:
        self.revision = revision
        self.right = right
        self.left = left
        self.send = send
        self.recv = recv

    @classmethod
    def empty(cls, revision: int) -> "LinkSet":
        return cls(revision, None, None, [], [])

    def abort(self) -> None:
        for c in self.send + self.recv:
            c.abort()

    def close(self) -> None:
        for c in self.send + self.recv:
            c.close()


def build_links(listener: Listener, revision: int, my_id: int, right: tuple[int, str, int], left: int,
                k: int, config: Config, deadline: float,
                abandoned: Callable[[], bool] = lambda: False) -> LinkSet:
    """Open K connections to ``right`` (id, host, port) and claim K from ``left``.

    Outgoing and incoming sides run concurrently so two neighbours never wait on each other.
    Raises PeerFailure (everything opened so far is closed) if any connection fails.
    """
    rid, rhost, rport = right
    out: list[socket.socket | None] = [None] * k
    errors: list[BaseException] = []

    def dial() -> None:
        try:
            for i in range(k):
                out[i] = connect(rhost, rport, my_id, rid, revision, i, config)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=dial, name="pccl-dial", daemon=True)
    t.start()
    inc: list[socket.socket] = []
    try:
        for i in range(k):
            inc.append(listener.claim(revision, left, i, deadline, abandoned))
    except BaseException as exc:
        errors.append(exc)
    t.join(max(deadline - time.monotonic(), 0.0) + config.connect_timeout)
    if t.is_alive():
        errors.append(PeerFailure(f"connecting to peer {rid} did not finish in time"))
    if errors:
        for s in inc + [s for s in out if s is not None]:
            s.close()
        err = errors[0]
        raise err if isinstance(err, PeerFailure) else PeerFailure(f"building links failed: {err}") from err
    send = [Connection(s, f"r{revision}-to{rid}-{i}") for i, s in enumerate(out) if s is not None]
    recv = [Connection(s, f"r{revision}-from{left}-{i}") for i, s in enumerate(inc)]
    return LinkSet(revision, rid, left, send, recv)


class Mesh:
    """Direct connections of one world revision to any participant, for star and hierarchical
    collectives: K per directed pair, opened lazily by each connection's own worker thread on
    first use (the dialing side connects, the other claims from the listener), cached until the
    next topology. Connection indices start at ``MESH_INDEX`` so they never collide with ring
    links of the same pair."""

    def __init__(self, listener: "Listener", revision: int, my_id: int, addresses: dict[int, tuple[str, int]],
                 k: int, config: Config, abandoned: Callable[[int], bool] = lambda pid: False) -> None:
        self.listener, self.revision, self.my_id = listener, revision, my_id
        self.addresses, self.k, self.config, self.abandoned = addresses, k, config, abandoned
        self._lock = threading.Lock()
        self._send: dict[int, list[Connection]] = {}
        self._recv: dict[int, list[Connection]] = {}
        self._closed = False

    def send(self, peer: int) -> list[Connection]:
        """K send-only connections to ``peer``."""
        with self._lock:
            if self._closed:
                raise PeerFailure("the data links of this revision are closed")
            if peer not in self._send:
                host, port = self.addresses[peer]
                self._send[peer] = [Connection(
                    None, f"r{self.revision}-mesh-to{peer}-{i}",
                    lambda i=i: connect(host, port, self.my_id, peer, self.revision, framing.MESH_INDEX + i,
                                        self.config)) for i in range(self.k)]
            return self._send[peer]

    def recv(self, peer: int) -> list[Connection]:
        """K receive-only connections from ``peer``. A claim waits until ``peer`` dials (peers
        reach an op's commencement at slightly different times, seconds apart under load), up to
        ``op_timeout``; it gives up as soon as the peer is known dead or the connection aborted."""
        with self._lock:
            if self._closed:
                raise PeerFailure("the data links of this revision are closed")
            if peer not in self._recv:
                conns = []
                for i in range(self.k):
                    def claim(i: int = i) -> socket.socket:
                        return self.listener.claim(self.revision, peer, framing.MESH_INDEX + i,
                                                   time.monotonic() + self.config.op_timeout,
                                                   lambda: self.abandoned(peer) or conns[i].aborted)
                    conns.append(Connection(None, f"r{self.revision}-mesh-from{peer}-{i}", claim))
                self._recv[peer] = conns
            return self._recv[peer]

    def _all(self) -> list[Connection]:
        with self._lock:
            return [c for conns in list(self._send.values()) + list(self._recv.values()) for c in conns]

    def abort(self) -> None:
        for c in self._all():
            c.abort()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for c in self._all():
            c.close()

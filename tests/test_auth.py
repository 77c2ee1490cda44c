"""Authentication with a shared secret: the pure HMAC pieces, the master core's part, the data
handshake over real sockets, the bounded-resource limits of the data listener, and real peers
(processes and threads) with the right, a wrong and no secret."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import pccl
from pccl.config import Config, read_secret_file, resolve
from pccl.errors import AuthenticationFailed, InvalidUsage, PeerFailure
from pccl.master_core import MasterCore
from pccl.status import query_status
from pccl.transports import auth, framing, links
from pccl.transports import messages as m

SECRET = b"correct horse battery staple"
OTHER = b"wrong horse"
FUZZ = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- pure HMAC pieces
def test_mutual_exchange_succeeds_and_proofs_are_role_bound():
    ini = auth.Initiator(SECRET, auth.CONTROL)
    resp = auth.Responder(SECRET, auth.CONTROL, ini.nonce)
    mine = ini.answer(resp.nonce, resp.proof)
    assert resp.verify(mine)
    assert len(mine) == auth.PROOF_SIZE and mine != resp.proof
    # reflection: the responder's own proof is not a valid initiator proof
    assert not resp.verify(resp.proof)
    # the secret never appears in anything that crosses the wire
    for blob in (ini.nonce, resp.nonce, resp.proof, mine):
        assert SECRET not in blob


def test_wrong_secret_is_detected_by_both_sides():
    ini = auth.Initiator(OTHER, auth.CONTROL)
    resp = auth.Responder(SECRET, auth.CONTROL, ini.nonce)
    with pytest.raises(AuthenticationFailed, match="wrong secret"):
        ini.answer(resp.nonce, resp.proof)
    forged = auth.proof(OTHER, auth.CONTROL, auth.INITIATOR, ini.nonce, resp.nonce)
    assert not resp.verify(forged)


def test_replayed_proof_fails_against_a_fresh_nonce():
    ini = auth.Initiator(SECRET, auth.CONTROL)
    first = auth.Responder(SECRET, auth.CONTROL, ini.nonce)
    recorded = ini.answer(first.nonce, first.proof)
    again = auth.Responder(SECRET, auth.CONTROL, ini.nonce)  # same hello replayed; fresh server nonce
    assert first.nonce != again.nonce
    assert not again.verify(recorded)


def test_domain_and_context_bind_the_proof():
    n1, n2 = auth.new_nonce(), auth.new_nonce()
    p = auth.proof(SECRET, auth.DATA, auth.RESPONDER, n1, n2, b"ctx")
    assert auth.check(SECRET, auth.DATA, auth.RESPONDER, p, n1, n2, b"ctx")
    assert not auth.check(SECRET, auth.CONTROL, auth.RESPONDER, p, n1, n2, b"ctx")
    assert not auth.check(SECRET, auth.DATA, auth.RESPONDER, p, n1, n2, b"cty")
    # length prefixes: moving bytes between parts changes the proof
    assert not auth.check(SECRET, auth.DATA, auth.RESPONDER, p, n1 + n2[:1], n2[1:], b"ctx")


@FUZZ
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_arbitrary_challenges_and_proofs_never_pass(nonce, proof):
    ini = auth.Initiator(SECRET, auth.DATA)
    with pytest.raises(AuthenticationFailed):
        ini.answer(nonce, proof)
    try:
        resp = auth.Responder(SECRET, auth.DATA, nonce)
    except AuthenticationFailed:
        assert len(nonce) != auth.NONCE_SIZE
        return
    assert not resp.verify(proof)


# --------------------------------------------------------------------------- config
def test_secret_never_shows_in_repr_and_is_bytes(monkeypatch):
    c = Config(secret="s3cr3t-value")
    assert c.secret == b"s3cr3t-value"
    assert "s3cr3t" not in repr(c) and "s3cr3t" not in str(c)
    with pytest.raises(InvalidUsage) as e:
        Config(secret="")
    assert "secret" in str(e.value)


def test_secret_precedence_explicit_then_config_then_env(monkeypatch):
    monkeypatch.setenv("PCCL_SECRET", "from-env")
    assert resolve(None).secret == b"from-env"
    assert resolve(Config()).secret == b"from-env"
    assert resolve(Config(secret=b"cfg")).secret == b"cfg"
    assert resolve(Config(secret=b"cfg"), secret="arg").secret == b"arg"
    assert Config.from_env({"PCCL_SECRET": ""}).secret is None
    monkeypatch.delenv("PCCL_SECRET")
    c = Config()
    assert resolve(c) is c and c.secret is None


def test_secret_file(tmp_path):
    p = tmp_path / "secret"
    p.write_bytes(b"  abc\n")
    assert read_secret_file(str(p)) == b"abc"
    p.write_bytes(b"\n")
    with pytest.raises(InvalidUsage, match="empty"):
        read_secret_file(str(p))
    with pytest.raises(InvalidUsage, match="cannot read"):
        read_secret_file(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- master core (pure)
def register_msg() -> m.Register:
    return m.Register(group=0, data_host="127.0.0.1", data_port=1, locality="x", name="p")


def authenticate(core: MasterCore, conn: str, secret: bytes, now: float = 0.0) -> list:
    ini = auth.Initiator(secret, auth.CONTROL)
    out = core.handle(conn, m.AuthHello(nonce=ini.nonce), now)
    assert len(out) == 1 and isinstance(out[0].msg, m.AuthChallenge)
    mine = ini.answer(out[0].msg.nonce, out[0].msg.proof)  # raises if the master's secret differs
    return core.handle(conn, m.AuthProof(proof=mine), now)


def test_core_registers_only_after_a_valid_proof():
    core = MasterCore(Config(secret=SECRET))
    out = core.handle("a", register_msg(), 0.0)
    assert [type(s.msg) for s in out] == [m.AuthFailed] and not core.peers
    assert authenticate(core, "a", SECRET) == []
    out = core.handle("a", register_msg(), 0.0)
    assert any(isinstance(s.msg, m.Registered) for s in out) and len(core.peers) == 1
    # a registered peer stays proven: a heartbeat is served normally
    assert all(not isinstance(s.msg, m.AuthFailed) for s in core.handle("a", m.Heartbeat(), 0.1))


def test_core_refuses_a_wrong_proof_and_unauthenticated_status():
    core = MasterCore(Config(secret=SECRET))
    ini = auth.Initiator(OTHER, auth.CONTROL)
    ch = core.handle("b", m.AuthHello(nonce=ini.nonce), 0.0)[0].msg
    with pytest.raises(AuthenticationFailed):
        ini.answer(ch.nonce, ch.proof)
    forged = auth.proof(OTHER, auth.CONTROL, auth.INITIATOR, ini.nonce, ch.nonce)
    out = core.handle("b", m.AuthProof(proof=forged), 0.0)
    assert isinstance(out[0].msg, m.AuthFailed) and "wrong secret" in out[0].msg.reason
    assert "b" not in core.proven
    assert isinstance(core.handle("b", m.StatusQuery(req=1), 0.0)[0].msg, m.AuthFailed)
    assert isinstance(core.handle("b", register_msg(), 0.0)[0].msg, m.AuthFailed) and not core.peers
    # a proof replayed on another connection does not authenticate it
    good = auth.Initiator(SECRET, auth.CONTROL)
    ch = core.handle("c", m.AuthHello(nonce=good.nonce), 0.0)[0].msg
    proof = good.answer(ch.nonce, ch.proof)
    core.handle("d", m.AuthHello(nonce=good.nonce), 0.0)
    assert isinstance(core.handle("d", m.AuthProof(proof=proof), 0.0)[0].msg, m.AuthFailed)
    assert core.handle("c", m.AuthProof(proof=proof), 0.0) == []
    assert isinstance(core.handle("c", m.StatusQuery(req=2), 0.0)[0].msg, m.StatusReply)


def test_core_without_secret_refuses_a_peer_that_offers_one():
    core = MasterCore(Config())
    out = core.handle("a", m.AuthHello(nonce=auth.new_nonce()), 0.0)
    assert isinstance(out[0].msg, m.AuthFailed) and "no secret" in out[0].msg.reason
    assert any(isinstance(s.msg, m.Registered) for s in core.handle("a", register_msg(), 0.0))


def test_core_bounds_and_expires_pending_authentications():
    cfg = Config(secret=SECRET, max_half_open=3, connect_timeout=2.0)
    core = MasterCore(cfg)
    for i in range(3):
        assert isinstance(core.handle(i, m.AuthHello(nonce=auth.new_nonce()), 0.0)[0].msg, m.AuthChallenge)
    out = core.handle(99, m.AuthHello(nonce=auth.new_nonce()), 0.0)
    assert isinstance(out[0].msg, m.AuthFailed) and "too many" in out[0].msg.reason
    assert core.next_deadline() == 2.0
    core.tick(2.0)
    assert not core.challenges
    # proven but never registered: forgotten after connect_timeout too
    authenticate(core, "p", SECRET, now=3.0)
    assert "p" in core.proven
    core.tick(5.0)
    assert "p" not in core.proven
    assert isinstance(core.handle("p", register_msg(), 5.1)[0].msg, m.AuthFailed)
    # a disconnect forgets everything about the connection
    core.handle("q", m.AuthHello(nonce=auth.new_nonce()), 6.0)
    core.disconnected("q", 6.1)
    assert "q" not in core.challenges


def test_core_malformed_auth_messages_are_refused_not_raised():
    core = MasterCore(Config(secret=SECRET))
    for msg in (m.AuthHello(nonce=b""), m.AuthHello(nonce=b"x" * 33), m.AuthProof(proof=b"y" * 32)):
        out = core.handle("z", msg, 0.0)
        assert [type(s.msg) for s in out] == [m.AuthFailed]
    assert not core.peers and not core.proven


@st.composite
def auth_traffic(draw):
    """Interleaved messages from a few connections: real auth steps, garbage, and protocol messages."""
    conns = ["a", "b", "c"]
    steps = []
    for _ in range(draw(st.integers(1, 25))):
        conn = draw(st.sampled_from(conns))
        kind = draw(st.sampled_from(["hello", "hello_bad", "proof_bad", "proof_good", "register", "status",
                                     "heartbeat", "disconnect", "tick"]))
        steps.append((conn, kind, draw(st.binary(max_size=40)), draw(st.floats(0, 3))))
    return steps


@settings(max_examples=40, deadline=None)
@given(auth_traffic())
def test_core_auth_state_machine_never_registers_an_unproven_connection(steps):
    core = MasterCore(Config(secret=SECRET, max_half_open=2, connect_timeout=2.0))
    inits: dict[str, auth.Initiator] = {}
    proven_ok: set[str] = set()
    now = 0.0
    for conn, kind, junk, dt in steps:
        now += dt
        if kind == "hello":
            inits[conn] = auth.Initiator(SECRET, auth.CONTROL)
            out = core.handle(conn, m.AuthHello(nonce=inits[conn].nonce), now)
            if out and isinstance(out[0].msg, m.AuthChallenge):
                inits[conn].challenge = out[0].msg  # type: ignore[attr-defined]
        elif kind == "hello_bad":
            core.handle(conn, m.AuthHello(nonce=junk), now)
        elif kind == "proof_bad":
            core.handle(conn, m.AuthProof(proof=junk), now)
        elif kind == "proof_good" and getattr(inits.get(conn), "challenge", None) is not None:
            ch = inits[conn].challenge  # type: ignore[attr-defined]
            out = core.handle(conn, m.AuthProof(proof=inits[conn].answer(ch.nonce, ch.proof)), now)
            if not out:
                proven_ok.add(conn)
        elif kind == "register":
            out = core.handle(conn, register_msg(), now)
            if any(isinstance(s.msg, m.Registered) for s in out):
                assert conn in proven_ok  # only a connection that proved the secret registers
        elif kind == "status":
            core.handle(conn, m.StatusQuery(req=1), now)
        elif kind == "heartbeat":
            core.handle(conn, m.Heartbeat(), now)
        elif kind == "disconnect":
            core.disconnected(conn, now)
            proven_ok.discard(conn)
            inits.pop(conn, None)
        else:
            core.tick(now)
        assert len(core.challenges) <= 2
        assert set(core.proven) <= proven_ok
        assert all(p.conn in proven_ok for p in core.peers.values() if p.alive)


# --------------------------------------------------------------------------- data handshake (real sockets)
@pytest.fixture
def listener_factory():
    made: list[links.Listener] = []

    def make(config: Config, peer_id: int = 7) -> links.Listener:
        lst = links.Listener("127.0.0.1", 0, config)
        lst.assign(peer_id)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()


def test_data_handshake_with_the_right_secret_links_up(listener_factory):
    cfg = Config(secret=SECRET, connect_timeout=5.0)
    lst = listener_factory(cfg)
    s = links.connect("127.0.0.1", lst.port, 3, 7, 1, 0, cfg)
    r = lst.claim(1, 3, 0, time.monotonic() + 5)
    s.sendall(b"hello")
    assert r.recv(5) == b"hello"
    s.close()
    r.close()


@pytest.mark.parametrize("mine, theirs, match", [
    (None, SECRET, "requires the shared secret"),
    (SECRET, None, "has no secret"),
    (OTHER, SECRET, "did not prove the shared secret"),
])
def test_data_handshake_mismatch_fails_clearly_and_the_listener_keeps_serving(listener_factory, mine, theirs,
                                                                             match):
    lst = listener_factory(Config(secret=theirs, connect_timeout=5.0))
    with pytest.raises(AuthenticationFailed, match=match) as e:
        links.connect("127.0.0.1", lst.port, 3, 7, 1, 0, Config(secret=mine, connect_timeout=5.0))
    for secret in (SECRET, OTHER):
        assert secret.decode() not in str(e.value)
    good = Config(secret=theirs, connect_timeout=5.0)
    s = links.connect("127.0.0.1", lst.port, 3, 7, 1, 1, good)
    lst.claim(1, 3, 1, time.monotonic() + 5).close()
    s.close()


def test_a_listener_that_accepts_without_proving_the_secret_is_refused():
    """Mutual: a fake listener answering a plain ack to an authenticating connector is not trusted."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def fake() -> None:
        c, _ = srv.accept()
        with c:
            c.recv(framing.HANDSHAKE_SIZE + auth.NONCE_SIZE)
            c.sendall(framing.encode_ack(7))
            c.recv(1)

    t = threading.Thread(target=fake, daemon=True)
    t.start()
    try:
        with pytest.raises(AuthenticationFailed, match="without proving"):
            links.connect("127.0.0.1", port, 3, 7, 1, 0, Config(secret=SECRET, connect_timeout=5.0))
    finally:
        t.join(10)
        srv.close()


def test_a_master_that_answers_without_proving_the_secret_is_refused():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    comm = pccl.Communicator(f"127.0.0.1:{port}", timeouts=Config(), secret=SECRET)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            comm.connect(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert router.poll(20000)
        conn, hello = router.recv_multipart()
        assert isinstance(m.decode(hello), m.AuthHello)
        router.send_multipart([conn, m.encode(m.Registered(peer_id=1, accepted=True))])
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], AuthenticationFailed), errors
        assert "without proving" in str(errors[0])
    finally:
        comm.close()
        router.close(0)
        ctx.term()


def test_raw_client_that_skips_or_garbles_the_auth_is_dropped(listener_factory):
    cfg = Config(secret=SECRET, connect_timeout=5.0)
    lst = listener_factory(cfg)
    # a plain handshake (no auth) gets a refusal, then EOF
    with socket.create_connection(("127.0.0.1", lst.port), timeout=5) as s:
        s.sendall(framing.encode_handshake(framing.Handshake(3, 1, 0)))
        rep = framing.decode_reply(s.recv(framing.ACK_SIZE))
        assert (rep.kind, rep.value) == ("nak", framing.NAK_NEED_SECRET)
        assert s.recv(1) == b""
    # an auth handshake, then a garbage proof: refusal, EOF, nothing parked
    with socket.create_connection(("127.0.0.1", lst.port), timeout=5) as s:
        s.sendall(framing.encode_handshake(framing.Handshake(3, 1, 2, auth=True)) + auth.new_nonce())
        buf = b""
        while len(buf) < framing.ACK_SIZE + auth.NONCE_SIZE + auth.PROOF_SIZE:
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
        assert framing.decode_reply(buf[:framing.ACK_SIZE]).kind == "challenge"
        s.sendall(b"\x00" * auth.PROOF_SIZE)
        rep = framing.decode_reply(s.recv(framing.ACK_SIZE))
        assert (rep.kind, rep.value) == ("nak", framing.NAK_BAD_PROOF)
        assert s.recv(1) == b""
    with pytest.raises(PeerFailure):
        lst.claim(1, 3, 2, time.monotonic() + 0.3)


# --------------------------------------------------------------------------- bounded resources
def test_slowloris_is_closed_before_the_handshake_completes(listener_factory):
    """A client trickling one byte every 0.25 s never trips a per-read timeout of 1 s; the total
    deadline must close it before its 32-byte handshake is complete."""
    lst = listener_factory(Config(connect_timeout=1.0))
    blob = framing.encode_handshake(framing.Handshake(3, 1, 0))
    s = socket.create_connection(("127.0.0.1", lst.port), timeout=5)
    cut = threading.Event()

    def watch():
        try:
            s.settimeout(30)
            if s.recv(1) == b"":
                cut.set()
        except OSError:
            cut.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    sent = 0
    try:
        for b in blob:
            if cut.is_set():
                break
            s.sendall(bytes([b]))
            sent += 1
            time.sleep(0.25)
    except OSError:
        pass
    t.join(30)
    s.close()
    assert cut.is_set(), "the listener never closed a connection that trickled its handshake"
    assert sent < len(blob), "the trickled handshake completed: the deadline is not total"


def test_half_open_connections_are_capped(listener_factory):
    cfg = Config(max_half_open=4, connect_timeout=10.0)
    lst = listener_factory(cfg)
    idle = [socket.create_connection(("127.0.0.1", lst.port), timeout=5) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while lst._half_open < 4:  # all four accepted and waiting for their handshake
            assert time.monotonic() < deadline
            time.sleep(0.01)
        extra = socket.create_connection(("127.0.0.1", lst.port), timeout=5)
        extra.settimeout(10)
        try:
            assert extra.recv(1) == b""  # closed at once
        except ConnectionResetError:
            pass
        extra.close()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while lst._half_open:  # the idle ones are released when they close
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s = links.connect("127.0.0.1", lst.port, 3, 7, 1, 0, cfg)
    lst.claim(1, 3, 0, time.monotonic() + 5).close()
    s.close()


def test_parked_connections_of_vanished_connectors_free_their_slots(listener_factory):
    cfg = Config(max_half_open=2, connect_timeout=5.0)
    lst = listener_factory(cfg)
    for i in range(2):  # two links nobody will claim (another revision); their connectors vanish
        s = links.connect("127.0.0.1", lst.port, 3, 7, 99, i, cfg)
        s.close()
    deadline = time.monotonic() + 10
    while len(lst._parked) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s = links.connect("127.0.0.1", lst.port, 3, 7, 1, 0, cfg)  # the slots are reclaimed, not refused
    lst.claim(1, 3, 0, time.monotonic() + 5).close()
    s.close()
    assert not any(k[0] == 99 for k in lst._parked)


def test_master_closes_a_connection_that_never_finishes_the_zmtp_greeting():
    """libzmq's default greeting timeout is 30 s; the master uses connect_timeout (1 s here), so a
    silent or trickling client is gone well within the 15 s this test waits."""
    with pccl.Master("127.0.0.1", 0, config=Config(connect_timeout=1.0)) as master:
        host, port = master.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"\xff")  # the first byte of a greeting, then nothing
            s.settimeout(15)
            closed = False
            try:
                while s.recv(4096):
                    pass  # the master's own greeting bytes
                closed = True
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                closed = False
            assert closed, "the master kept a half-greeted connection open"
        assert "revision" in master.status()


# --------------------------------------------------------------------------- real peers (threads)
def test_secret_on_the_peer_only_is_refused_clearly():
    with pccl.Master("127.0.0.1", 0, config=Config()) as master:
        comm = pccl.Communicator(master.address, timeouts=Config(), secret="only-here")
        with pytest.raises(AuthenticationFailed, match="no secret configured"):
            comm.connect(timeout=20)
        comm.close()
        assert not master.core.peers



def test_group_with_secret_all_reduce_sync_and_optimize(monkeypatch):
    from test_shared_state import close_all, group, make_state, sync_all, together

    monkeypatch.setenv("PCCL_SECRET", "group-secret")
    monkeypatch.setenv("PCCL_PROBE_SECONDS", "0.2")
    with pccl.Master("127.0.0.1", 0, config=Config(probe_seconds=0.2)) as master:
        assert master.config.secret == b"group-secret"
        comms = group(master, 3, connections=1)
        try:
            assert all(c.config.secret == b"group-secret" for c in comms)
            states = [make_state(i, revision=1 + (i == 0)) for i in range(3)]
            infos, errs = sync_all(comms, states)
            assert errs == [None] * 3 and sum(i.rx_bytes for i in infos) > 0
            _, errs = together([c.optimize_topology for c in comms], timeout=120)
            assert errs == [None] * 3 and len(master.core.bandwidth) == 6
            assert all(v > 0 for v in master.core.bandwidth.values())
            xs = [np.full(1000, i + 1, dtype=np.float32) for i in range(3)]
            _, errs = together([lambda c=c, x=x: c.all_reduce(x) for c, x in zip(comms, xs)])
            assert errs == [None] * 3 and all((x == 6).all() for x in xs)
            # status needs the secret too
            assert "ring" in query_status(master.address)
            monkeypatch.delenv("PCCL_SECRET")
            with pytest.raises(AuthenticationFailed, match="requires the shared secret"):
                query_status(master.address)
            with pytest.raises(AuthenticationFailed, match="wrong secret"):
                query_status(master.address, secret="nope")
            assert "group-secret" not in master.status()
        finally:
            close_all(comms)


# --------------------------------------------------------------------------- real peers (processes)
def test_wrong_and_missing_secret_refused_while_an_authenticated_group_keeps_working(cluster_factory):
    cluster = cluster_factory(secret="process-secret")
    peers = [cluster.spawn("loop", i, "--world", "2", "--count", "1000", "--ops", "40", "--pause", "0.05")
             for i in range(2)]
    for p in peers:
        p.expect("op_ok", timeout=60, n=2)
    fast = Config(connect_timeout=3.0, master_timeout=6.0)
    for secret, match in ((None, "requires the shared secret"), ("not-the-secret", "wrong secret")):
        comm = pccl.Communicator(cluster.master.address, timeouts=fast, secret=secret)
        with pytest.raises(AuthenticationFailed, match=match) as e:
            comm.connect(timeout=20)
        assert "process-secret" not in str(e.value)
        comm.close()
    # raw zmq clients that skip the handshake or garble it are refused and never registered
    ctx = zmq.Context()
    try:
        for frames in ([m.encode(register_msg())], [m.encode(m.AuthProof(proof=b"x" * 32))],
                       [m.encode(m.AuthHello(nonce=b"short"))], [b"\x93\x01\xa8register\x80"]):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(f"tcp://{cluster.master.address}")
            d.send_multipart(frames)
            assert d.poll(10000), "the master did not answer"
            reply = m.decode(d.recv())
            assert isinstance(reply, (m.AuthFailed, m.Kicked))
            d.close(0)
    finally:
        ctx.term()
    status = cluster.master.status()
    assert "process-secret" not in status
    before = [sum(1 for e in p.log if e["event"] == "op_ok") for p in peers]
    for p, b in zip(peers, before):
        p.expect("op_ok", timeout=30, n=b + 5)
    for p in peers:
        p.expect("done", timeout=60)
    assert [e for p in peers for e in p.log if e["event"] == "op_fail"] == []


# --------------------------------------------------------------------------- CLI
def test_cli_master_and_status_read_the_secret_from_a_file(tmp_path):
    import subprocess
    import sys

    key = tmp_path / "key"
    key.write_text("cli-secret-value\n")
    cli = [sys.executable, "-m", "pccl.cli"]
    proc = subprocess.Popen(cli + ["master", "--host", "127.0.0.1", "--port", "0", "--secret-file", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "peers must prove the shared secret" in line, line
        address = line.split()[4]
        assert "requires the shared secret" in str(pytest.raises(AuthenticationFailed, query_status, address).value)
        r = subprocess.run(cli + ["status", "--master", address, "--secret-file", str(key)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "revision" in r.stdout, r.stderr
        assert "cli-secret-value" not in r.stdout + r.stderr + line
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "cli-secret-value" not in out + err


def test_a_listener_without_an_id_yet_holds_the_handshake_until_it_gets_one():
    """A newly admitted peer can be dialled before its control thread has read its Registered
    message: the handshake waits for the id (within connect_timeout) instead of refusing, and a
    peer that never gets one refuses once the timeout has passed."""
    cfg = Config(connect_timeout=3.0)
    lst = links.Listener("127.0.0.1", 0, cfg)
    try:
        threading.Timer(0.5, lst.assign, args=(7,)).start()
        t0 = time.monotonic()
        s = links.connect("127.0.0.1", lst.port, 3, 7, 1, 0, cfg)
        assert time.monotonic() - t0 >= 0.4
        lst.claim(1, 3, 0, time.monotonic() + 5).close()
        s.close()
    finally:
        lst.close()
    lst = links.Listener("127.0.0.1", 0, Config(connect_timeout=0.5))
    try:
        with pytest.raises(PeerFailure):
            links.connect("127.0.0.1", lst.port, 3, 7, 1, 0, Config(connect_timeout=5.0))
    finally:
        lst.close()

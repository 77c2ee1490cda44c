"""Live-port fuzzing: seeded random garbage at a running master and at running peers' data ports
(every handshake kind), then the same peers must keep producing exact all-reduce results.

The seed is printed (and taken from PCCL_FUZZ_SEED when set) so a failure can be replayed. The
fuzzing phase is bounded in time (FUZZ_SECONDS) so the default suite stays short. The parsers
behind these ports are fuzzed one by one with hypothesis in test_framing.py, test_messages.py and
test_auth.py; this test checks that the live shells around them drop bad input and keep serving.
"""
from __future__ import annotations

import os
import random
import re
import socket
import struct
import time

import msgpack
import pytest
import zmq

from pccl.transports import auth, framing
from pccl.transports import messages as m

FUZZ_SECONDS = 5.0  # per variant


def _data_ports(status: str) -> list[int]:
    return [int(tok.rsplit(":", 1)[1]) for line in status.splitlines() if " accepted" in line
            for tok in line.split() if re.fullmatch(r"[\d.]+:\d+", tok)]


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "insert", "delete", "truncate"])
        if op == "flip" and b:
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
        elif op == "insert":
            i = rng.randint(0, len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == "delete" and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 8)]
        elif op == "truncate" and b:
            del b[rng.randrange(len(b)):]
    return bytes(b)


def _control_frame(rng: random.Random) -> bytes:
    """One malformed (or valid but unauthorised) control frame."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 300))
    if kind == 1:  # a valid message of a random type, mutated
        msgs = [m.Heartbeat(), m.Leave(), m.StatusQuery(req=rng.randrange(1 << 20)),
                m.VoteTopology(optimize=True, admit=False), m.OpReport(seq=rng.randrange(9), ok=True, kind="", message=""),
                m.Withdraw(tag=rng.randrange(9)), m.AuthHello(nonce=rng.randbytes(32)),
                m.AuthProof(proof=rng.randbytes(32)), m.SyncReport(seq=1, ok=False, message="x")]
        return _mutate(rng, m.encode(rng.choice(msgs)))
    if kind == 2:  # msgpack headers that announce huge lengths
        return rng.choice([b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                           b"\xdf\xff\xff\xff\xff", b"\x93\x01\xa8announce\xdf\x7f\xff\xff\xff"])
    if kind == 3:  # well-formed msgpack, wrong structure
        return msgpack.packb(rng.choice([[1, "register", {}], [1, "announce", {"tag": -1}], {"a": 1},
                                         [2, "heartbeat", {}], [1, "nope", {}], [1, "heartbeat", {"x": 1}],
                                         [1, "auth_hello", {"nonce": "not bytes"}]]))
    if kind == 4:  # messages only the master may send, forged by a client
        return m.encode(rng.choice([m.Kicked(reason="x"), m.Topology(revision=9, members=()),
                                    m.AuthChallenge(nonce=b"0" * 32, proof=b"1" * 32)]))
    if kind == 5:  # bytes fields of the wrong size
        return m.encode(m.AuthHello(nonce=rng.randbytes(rng.choice([0, 1, 31, 33, 1000]))))
    return b""


def _fuzz_master_raw(rng: random.Random, host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=2) as s:
        choice = rng.randrange(3)
        if choice == 0:
            s.sendall(rng.randbytes(rng.randint(1, 4096)))
        elif choice == 1:  # a ZMTP greeting cut short, or followed by garbage
            greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16
            s.sendall(greeting[:rng.randint(1, len(greeting))] + rng.randbytes(rng.randint(0, 64)))
        else:  # a ZMTP frame header claiming a huge body
            s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 16 + b"\x06" +
                      struct.pack(">Q", (1 << 62)) + rng.randbytes(64))


def _fuzz_master_zmq(rng: random.Random, ctx: zmq.Context, address: str, secret: bytes | None) -> None:
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://{address}")
    if secret is not None and rng.random() < 0.5:  # an insider: authenticates, then sends garbage
        ini = auth.Initiator(secret, auth.CONTROL)
        d.send(m.encode(m.AuthHello(nonce=ini.nonce)))
        if d.poll(2000):
            ch = m.decode(d.recv())
            if isinstance(ch, m.AuthChallenge):  # (AuthFailed when too many are authenticating)
                d.send(m.encode(m.AuthProof(proof=ini.answer(ch.nonce, ch.proof))))
    for _ in range(rng.randint(1, 6)):
        frames = [_control_frame(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        d.send_multipart(frames)
    if rng.random() < 0.3:  # one over the size cap: libzmq drops this connection
        d.send(b"\x00" * ((1 << 20) + 1))
    d.poll(50)
    d.close(0)


def _open(s: socket.socket, hs: framing.Handshake, secret: bytes | None) -> None:
    """Send ``hs``; with a secret, complete the challenge-response as a real connector does."""
    blob = framing.encode_handshake(hs)
    if secret is not None:
        ini = auth.Initiator(secret, auth.DATA)
        s.sendall(blob + ini.nonce)
        head = _recv(s, framing.ACK_SIZE)
        assert framing.decode_reply(head).kind == "challenge"  # an insider is always challenged
        rest = _recv(s, auth.NONCE_SIZE + auth.PROOF_SIZE)
        s.sendall(ini.answer(rest[:auth.NONCE_SIZE], rest[auth.NONCE_SIZE:], blob, head))
        assert framing.decode_reply(_recv(s, framing.ACK_SIZE)).kind == "ack"  # and admitted
        return
    s.sendall(blob)
    if framing.decode_reply(_recv(s, framing.ACK_SIZE)).kind != "ack":  # an outsider: refused
        raise ConnectionRefusedError("refused at the handshake")


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("closed during the handshake")
        buf += chunk
    return buf


def _fuzz_data_port(rng: random.Random, port: int, parked_budget: list[int], secret: bytes | None) -> bool:
    """One attack; True if it got past the handshake (as an insider, or without a secret)."""
    opened = False
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.settimeout(2)
        choice = rng.randrange(6)
        hs = framing.Handshake(rng.randrange(1 << 40), rng.randrange(1 << 40), rng.randrange(framing.MAX_CONNECTIONS),
                               rng.choice(framing.KINDS), auth=secret is not None)
        blob = framing.encode_handshake(hs)
        if choice == 0:
            s.sendall(rng.randbytes(rng.randint(1, 512)))
        elif choice == 1:  # truncated or mutated handshake
            s.sendall(_mutate(rng, blob))
        elif choice == 2 and hs.kind == framing.KIND_LINK and parked_budget[0] > 0:
            parked_budget[0] -= 1  # a parked, never-claimed link, then frames with huge lengths
            _open(s, hs, secret)
            opened = True
            s.sendall(framing.encode_frame(framing.FrameHeader(1, 0, 0, (1 << 64) - 1)) + rng.randbytes(64))
        elif choice == 3:  # a state request with huge or random fields, or random bytes
            _open(s, framing.Handshake(hs.peer_id, hs.revision, 0, framing.KIND_STATE, hs.auth), secret)
            opened = True
            s.sendall(rng.choice([
                framing.encode_state_request(framing.StateRequest(hs.revision, rng.randrange(1 << 32),
                                                                  rng.randrange(1 << 64), (1 << 64) - 1)),
                framing.encode_state_request(framing.StateRequest(rng.randrange(1 << 64), 0, 0, 16)),
                rng.randbytes(framing.STATE_REQ_SIZE), rng.randbytes(rng.randint(1, 200))]))
        elif choice == 4:  # a probe that sends a little and leaves
            _open(s, framing.Handshake(hs.peer_id, 0, 0, framing.KIND_PROBE, hs.auth), secret)
            opened = True
            s.sendall(rng.randbytes(rng.randint(0, 4096)))
        else:  # the other side of the auth: the wrong mode, or a garbage proof
            s.sendall(framing.encode_handshake(framing.Handshake(1, 1, 0, auth=rng.random() < 0.7)) +
                      auth.new_nonce() + rng.randbytes(rng.choice([0, auth.PROOF_SIZE, 100])))
        if rng.random() < 0.5:
            s.settimeout(0.2)
            try:
                s.recv(256)
            except OSError:
                pass
    return opened


@pytest.mark.parametrize("secret", [None, b"live-fuzz-secret"], ids=["open", "secret"])
def test_live_master_and_data_ports_survive_fuzzing(cluster_factory, secret):
    """With a secret, half the fuzzing comes from an insider that knows it (so the parsers behind
    the authentication are reached too) and half from outsiders that must be refused."""
    seed = int(os.environ.get("PCCL_FUZZ_SEED", random.randrange(1 << 30)))
    print(f"live fuzz seed {seed} (replay with PCCL_FUZZ_SEED={seed})")
    rng = random.Random(seed)
    cluster = cluster_factory(**({} if secret is None else {"secret": secret.decode()}))
    peers = [cluster.spawn("loop", i, "--world", "2", "--count", "5000", "--ops", "100000", "--pause", "0.05",
                           "--duration", "120") for i in range(2)]
    for p in peers:
        p.expect("op_ok", timeout=60, n=2)
    host, port = cluster.master.address.rsplit(":", 1)
    ports = _data_ports(cluster.master.status())
    assert len(ports) == 2
    ctx = zmq.Context()
    parked_budget = [10]
    counts = {"raw": 0, "zmq": 0, "data": 0, "past_handshake": 0}
    end = time.monotonic() + FUZZ_SECONDS
    try:
        while time.monotonic() < end:
            r = rng.random()
            try:
                if r < 0.2:
                    _fuzz_master_raw(rng, host, int(port))
                    counts["raw"] += 1
                elif r < 0.5:
                    _fuzz_master_zmq(rng, ctx, cluster.master.address, secret)
                    counts["zmq"] += 1
                else:
                    insider = secret if rng.random() < 0.5 else None
                    counts["data"] += 1
                    counts["past_handshake"] += _fuzz_data_port(rng, rng.choice(ports), parked_budget, insider)
            except OSError:
                pass  # the port may close on us mid-send: that is the expected defence
    finally:
        ctx.term()
    print(f"fuzz attempts: {counts}")
    assert min(counts.values()) > 0  # every port was hit, and some garbage got past the handshake
    # The master and both peers still serve exact all-reduces with the same peers.
    before = [sum(1 for e in p.log if e["event"] == "op_ok") for p in peers]
    for p, b in zip(peers, before):
        p.expect("op_ok", timeout=60, n=b + 10)
    oks = [e for p in peers for e in p.log if e["event"] == "op_ok"]
    assert all(e["value"] == 3.0 and e["uniform"] and e["world"] == 2 for e in oks)
    assert [e for p in peers for e in p.log if e["event"] in ("op_fail", "fatal")] == []
    cluster.master.status()  # the master loop did not crash
    for p in peers:
        p.popen.terminate()

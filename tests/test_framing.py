"""Data-plane byte formats: round trips, and fuzzing that must end in ProtocolError and nothing else."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.errors import ProtocolError
from pccl.transports import framing as f

U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
FUZZ = settings(max_examples=60, deadline=None)
CAP = 1 << 20


def test_sizes_are_fixed():
    assert (f.HANDSHAKE_SIZE, f.ACK_SIZE, f.FRAME_SIZE) == (32, 16, 32)


# --------------------------------------------------------------------------- round trips
@FUZZ
@given(U64, U64, st.integers(0, f.MAX_CONNECTIONS - 1))
def test_handshake_round_trip(pid, rev, index):
    h = f.Handshake(pid, rev, index)
    blob = f.encode_handshake(h)
    assert len(blob) == f.HANDSHAKE_SIZE and blob.startswith(f.HANDSHAKE_MAGIC)
    assert f.decode_handshake(blob) == h
    assert f.decode_handshake(bytearray(blob)) == h
    assert f.decode_handshake(memoryview(blob)) == h


@FUZZ
@given(U64)
def test_ack_round_trip(pid):
    blob = f.encode_ack(pid)
    assert len(blob) == f.ACK_SIZE and blob.startswith(f.ACK_MAGIC)
    assert f.decode_ack(blob) == pid


@FUZZ
@given(U64, U32, U32, st.integers(0, CAP))
def test_frame_round_trip(seq, step, piece, nbytes):
    h = f.FrameHeader(seq, step, piece, nbytes)
    blob = f.encode_frame(h)
    assert len(blob) == f.FRAME_SIZE
    assert f.decode_frame(blob, CAP) == h
    assert f.decode_frame(bytearray(blob), CAP) == h
    assert f.decode_frame(memoryview(blob), CAP) == h


# --------------------------------------------------------------------------- caps and fields
@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 62)))
@settings(max_examples=100, deadline=None)
def test_frame_nbytes_cap_is_enforced(nbytes, cap):
    blob = f.encode_frame(f.FrameHeader(1, 2, 3, nbytes))
    if nbytes <= cap:
        assert f.decode_frame(blob, cap).nbytes == nbytes
    else:
        with pytest.raises(ProtocolError, match="cap"):
            f.decode_frame(blob, cap)


def test_frame_cap_boundary():
    blob = f.encode_frame(f.FrameHeader(1, 0, 0, CAP))
    assert f.decode_frame(blob, CAP).nbytes == CAP
    with pytest.raises(ProtocolError):
        f.decode_frame(blob, CAP - 1)
    with pytest.raises(ProtocolError):
        f.decode_frame(f.encode_frame(f.FrameHeader(1, 0, 0, (1 << 64) - 1)), CAP)


def test_handshake_index_and_kind_checked():
    top = f.MESH_INDEX + f.MAX_CONNECTIONS - 1  # ring links 0..63, mesh links 64..127
    ok = f.encode_handshake(f.Handshake(1, 2, top))
    assert f.decode_handshake(ok).index == top
    with pytest.raises(ProtocolError):
        f.decode_handshake(f.encode_handshake(f.Handshake(1, 2, top + 1)))
    for kind in f.KINDS:
        assert f.decode_handshake(f.encode_handshake(f.Handshake(1, 2, 0, kind))).kind == kind
    unknown_kind = struct.pack("<8sQQII", f.HANDSHAKE_MAGIC, 1, 2, 0, 7)
    with pytest.raises(ProtocolError):
        f.decode_handshake(unknown_kind)


@FUZZ
@given(U64, U32, U64, st.integers(0, CAP))
def test_state_headers_round_trip(seq, key, offset, nbytes):
    req = f.StateRequest(seq, key, offset, nbytes)
    assert f.decode_state_request(f.encode_state_request(req), CAP) == req
    rep = f.StateReply(f.STATE_NOT_SERVING, seq, nbytes)
    assert f.decode_state_reply(f.encode_state_reply(rep), CAP) == rep
    with pytest.raises(ProtocolError, match="cap"):
        f.decode_state_request(f.encode_state_request(f.StateRequest(seq, key, offset, CAP + 1)), CAP)
    with pytest.raises(ProtocolError):
        f.decode_state_reply(f.encode_state_reply(f.StateReply(3, seq, 0)), CAP)


def test_frame_reserved_and_magic_checked():
    with pytest.raises(ProtocolError):
        f.decode_frame(struct.pack("<IIQIIQ", f.FRAME_MAGIC, 1, 1, 0, 0, 8), CAP)
    with pytest.raises(ProtocolError):
        f.decode_frame(struct.pack("<IIQIIQ", f.FRAME_MAGIC ^ 1, 0, 1, 0, 0, 8), CAP)


def test_wrong_magic_of_other_formats():
    # a handshake is not an ack, and vice versa (both start with an 8-byte magic)
    with pytest.raises(ProtocolError):
        f.decode_ack(f.encode_handshake(f.Handshake(1, 1, 1))[: f.ACK_SIZE])
    with pytest.raises(ProtocolError):
        f.decode_handshake(f.encode_ack(1) * 2)


# --------------------------------------------------------------------------- fuzz
DECODERS = {
    "handshake": (f.decode_handshake, f.HANDSHAKE_SIZE),
    "ack": (f.decode_ack, f.ACK_SIZE),
    "reply": (f.decode_reply, f.ACK_SIZE),
    "frame": (lambda b: f.decode_frame(b, CAP), f.FRAME_SIZE),
    "state_request": (lambda b: f.decode_state_request(b, CAP), f.STATE_REQ_SIZE),
    "state_reply": (lambda b: f.decode_state_reply(b, CAP), f.STATE_REP_SIZE),
}


def only_protocol_error(decoder, data):
    try:
        return decoder(data)
    except ProtocolError:
        return None


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.binary(max_size=80))
def test_random_bytes_of_every_length(name, data):
    decoder, size = DECODERS[name]
    result = only_protocol_error(decoder, data)
    if len(data) != size:
        assert result is None


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_wrong_length_is_refused(name):
    decoder, size = DECODERS[name]
    good = {"handshake": f.encode_handshake(f.Handshake(1, 2, 3)), "ack": f.encode_ack(9),
            "reply": f.encode_challenge(9),
            "frame": f.encode_frame(f.FrameHeader(1, 2, 3, 4)),
            "state_request": f.encode_state_request(f.StateRequest(1, 2, 3, 4)),
            "state_reply": f.encode_state_reply(f.StateReply(f.STATE_OK, 2, 3))}[name]
    for n in range(0, 2 * size + 2):
        data = (good * 3)[:n]
        if n == size:
            assert decoder(data) is not None
            continue
        with pytest.raises(ProtocolError):
            decoder(data)


@st.composite
def mutated(draw, name):
    good = {
        "handshake": lambda: f.encode_handshake(f.Handshake(draw(U64), draw(U64), draw(st.integers(0, 63)),
                                                            draw(st.sampled_from(f.KINDS)), draw(st.booleans()))),
        "ack": lambda: f.encode_ack(draw(U64)),
        "reply": lambda: draw(st.sampled_from([f.encode_ack(draw(U64)), f.encode_challenge(draw(U64)),
                                               f.encode_nak(draw(st.sampled_from(sorted(f.NAK_REASONS))))])),
        "frame": lambda: f.encode_frame(f.FrameHeader(draw(U64), draw(U32), draw(U32), draw(st.integers(0, CAP)))),
        "state_request": lambda: f.encode_state_request(
            f.StateRequest(draw(U64), draw(U32), draw(U64), draw(st.integers(0, CAP)))),
        "state_reply": lambda: f.encode_state_reply(
            f.StateReply(draw(st.sampled_from([0, 1, 2])), draw(U64), draw(st.integers(0, CAP)))),
    }[name]()
    blob = bytearray(good)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            i = draw(st.integers(0, len(blob)))
            blob[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            del blob[i:i + draw(st.integers(1, 4))]
    return bytes(blob)


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.data())
def test_mutated_headers(name, data):
    decoder, size = DECODERS[name]
    blob = data.draw(mutated(name))
    result = only_protocol_error(decoder, blob)
    if result is not None:
        assert len(blob) == size


@FUZZ
@given(st.integers(0, f.HANDSHAKE_SIZE - 1), st.integers(1, 255))
def test_handshake_magic_flips_refused(i, x):
    blob = bytearray(f.encode_handshake(f.Handshake(5, 6, 7)))
    blob[i] ^= x
    result = only_protocol_error(f.decode_handshake, bytes(blob))
    if i < 8:  # magic
        assert result is None
    elif 28 <= i:  # kind: only the known kinds pass
        assert result is None or result.kind in f.KINDS
    elif i >= 24:  # index: valid only while below MESH_INDEX + MAX_CONNECTIONS
        assert result is None or result.index < f.MESH_INDEX + f.MAX_CONNECTIONS


@FUZZ
@given(st.integers(0, f.FRAME_SIZE - 1), st.integers(1, 255))
def test_frame_header_flips(i, x):
    blob = bytearray(f.encode_frame(f.FrameHeader(5, 6, 7, 8)))
    blob[i] ^= x
    result = only_protocol_error(lambda b: f.decode_frame(b, CAP), bytes(blob))
    if i < 8:  # magic and reserved
        assert result is None
    elif result is not None:
        assert result.nbytes <= CAP


# --------------------------------------------------------------------------- authentication frames
@FUZZ
@given(U64, U64, st.integers(0, f.MAX_CONNECTIONS - 1), st.sampled_from(f.KINDS), st.booleans())
def test_auth_handshake_round_trip(pid, rev, index, kind, auth):
    h = f.Handshake(pid, rev, index, kind, auth)
    blob = f.encode_handshake(h)
    assert blob.startswith(f.HANDSHAKE_AUTH_MAGIC if auth else f.HANDSHAKE_MAGIC)
    assert f.decode_handshake(blob) == h


@FUZZ
@given(U64)
def test_replies_round_trip_and_unknown_refusals_are_rejected(value):
    assert f.decode_reply(f.encode_ack(value)) == f.Reply("ack", value)
    assert f.decode_reply(f.encode_challenge(value)) == f.Reply("challenge", value)
    if value in f.NAK_REASONS:
        assert f.decode_reply(f.encode_nak(value)) == f.Reply("nak", value)
    else:
        with pytest.raises(ProtocolError):
            f.decode_reply(f.encode_nak(value))


@FUZZ
@given(st.integers(0, 7), st.integers(1, 255))
def test_one_flip_never_turns_a_plain_handshake_into_an_auth_one(i, x):
    blob = bytearray(f.encode_handshake(f.Handshake(5, 6, 7)))
    blob[i] ^= x
    assert only_protocol_error(f.decode_handshake, bytes(blob)) is None

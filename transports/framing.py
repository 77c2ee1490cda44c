"""Fixed-layout byte formats of the data plane (little-endian), as pure encode/decode functions.

* Handshake (connector -> listener, 32 bytes): magic, connector peer id, world revision (for a
  state transfer: the sync sequence number), connection index, kind (ring link, shared-state
  transfer, bandwidth probe). With a shared secret the magic is ``PCCLAUT1`` and the connector's
  32-byte nonce follows (see ``transports.auth``).
* Ack (listener -> connector, 16 bytes): magic, listener peer id, so the connector knows it
  reached the peer it meant (an address can be reused by a restarted peer).
  Other 16-byte replies of the same layout: a challenge (magic ``PCCLCHL1``, listener peer id,
  then the listener's nonce and proof, 32 bytes each; the connector answers with its 32-byte
  proof and gets an ack or a refusal) and a refusal (magic ``PCCLNAK1``, a reason code).
* Frame header (32 bytes) before every payload: magic, op sequence, step, piece, payload length.
* State request (receiver -> holder, 32 bytes): magic, key index, sync sequence, byte offset, length.
  State reply (holder -> receiver, 24 bytes): magic, status, sync sequence, length; then the bytes.

Decoders raise ``ProtocolError`` for any defect and never anything else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pccl.errors import ProtocolError

HANDSHAKE_MAGIC = b"PCCLDAT1"
HANDSHAKE_AUTH_MAGIC = b"PCCLAUT1"  # two bytes away from HANDSHAKE_MAGIC: one flip never turns one into the other
ACK_MAGIC = b"PCCLACK1"
CHALLENGE_MAGIC = b"PCCLCHL1"
NAK_MAGIC = b"PCCLNAK1"
FRAME_MAGIC = 0x46434350  # b"PCCF" read as little-endian u32

_HANDSHAKE = struct.Struct("<8sQQII")
_ACK = struct.Struct("<8sQ")
_FRAME = struct.Struct("<IIQIIQ")

HANDSHAKE_SIZE = _HANDSHAKE.size
ACK_SIZE = _ACK.size
FRAME_SIZE = _FRAME.size
MAX_CONNECTIONS = 64
#: first handshake index of star/hierarchical (mesh) connections; ring links use 0..K-1
MESH_INDEX = MAX_CONNECTIONS

#: handshake kinds
KIND_LINK = 0
KIND_STATE = 1
KIND_PROBE = 2
KINDS = (KIND_LINK, KIND_STATE, KIND_PROBE)

STATE_REQ_MAGIC = 0x52534350  # b"PCSR"
STATE_REP_MAGIC = 0x50534350  # b"PCSP"
_STATE_REQ = struct.Struct("<IIQQQ")
_STATE_REP = struct.Struct("<IIQQ")
STATE_REQ_SIZE = _STATE_REQ.size
STATE_REP_SIZE = _STATE_REP.size
#: state reply status codes
STATE_OK = 0
STATE_NOT_SERVING = 1
STATE_BAD_REQUEST = 2

#: refusal reasons of a data handshake
NAK_NEED_SECRET = 1  # the listener has a secret; the connector offered none
NAK_NO_SECRET = 2  # the connector offered authentication; the listener has no secret
NAK_BAD_PROOF = 3  # the connector's proof was wrong (a different secret)
NAK_REASONS = {
    NAK_NEED_SECRET: "it requires the shared secret and this side has none",
    NAK_NO_SECRET: "it has no secret configured and this side has one",
    NAK_BAD_PROOF: "the secrets differ (this side's proof was rejected)",
}


@dataclass(frozen=True)
class Handshake:
    peer_id: int
    revision: int
    index: int
    kind: int = KIND_LINK
    auth: bool = False  # a 32-byte nonce follows; HMAC challenge-response before the ack


@dataclass(frozen=True)
class Reply:
    """The listener's 16-byte answer: ``kind`` is "ack" or "challenge" (``value``: the listener's
    peer id) or "nak" (``value``: one of NAK_REASONS)."""

    kind: str
    value: int


@dataclass(frozen=True)
class FrameHeader:
    seq: int
    step: int
    piece: int
    nbytes: int


def encode_handshake(h: Handshake) -> bytes:
    magic = HANDSHAKE_AUTH_MAGIC if h.auth else HANDSHAKE_MAGIC
    return _HANDSHAKE.pack(magic, h.peer_id, h.revision, h.index, h.kind)


def decode_handshake(data: bytes | bytearray | memoryview) -> Handshake:
    if len(data) != HANDSHAKE_SIZE:
        raise ProtocolError(f"handshake must be {HANDSHAKE_SIZE} bytes, got {len(data)}")
    magic, pid, rev, index, kind = _HANDSHAKE.unpack(data)
    if magic not in (HANDSHAKE_MAGIC, HANDSHAKE_AUTH_MAGIC):
        raise ProtocolError("bad handshake magic (not a pccl data connection, or another version)")
    if index >= MESH_INDEX + MAX_CONNECTIONS or kind not in KINDS:
        raise ProtocolError(f"bad handshake fields (index {index}, kind {kind})")
    return Handshake(pid, rev, index, kind, magic == HANDSHAKE_AUTH_MAGIC)


def encode_ack(peer_id: int) -> bytes:
    return _ACK.pack(ACK_MAGIC, peer_id)


def decode_ack(data: bytes) -> int:
    if len(data) != ACK_SIZE:
        raise ProtocolError(f"ack must be {ACK_SIZE} bytes, got {len(data)}")
    magic, pid = _ACK.unpack(data)
    if magic != ACK_MAGIC:
        raise ProtocolError("bad ack magic")
    return pid


def encode_challenge(peer_id: int) -> bytes:
    """The 16-byte header of a challenge (the listener's nonce and proof follow)."""
    return _ACK.pack(CHALLENGE_MAGIC, peer_id)


def encode_nak(reason: int) -> bytes:
    return _ACK.pack(NAK_MAGIC, reason)


def decode_reply(data: bytes | bytearray | memoryview) -> Reply:
    """Parse the listener's 16-byte answer (ack, challenge header or refusal)."""
    if len(data) != ACK_SIZE:
        raise ProtocolError(f"handshake reply must be {ACK_SIZE} bytes, got {len(data)}")
    magic, value = _ACK.unpack(data)
    if magic == ACK_MAGIC:
        return Reply("ack", value)
    if magic == CHALLENGE_MAGIC:
        return Reply("challenge", value)
    if magic == NAK_MAGIC and value in NAK_REASONS:
        return Reply("nak", value)
    raise ProtocolError("bad handshake reply (not a pccl data listener, or another version)")


def encode_frame(h: FrameHeader) -> bytes:
    return _FRAME.pack(FRAME_MAGIC, 0, h.seq, h.step, h.piece, h.nbytes)


def decode_frame(data: bytes | bytearray | memoryview, max_bytes: int) -> FrameHeader:
    if len(data) != FRAME_SIZE:
        raise ProtocolError(f"frame header must be {FRAME_SIZE} bytes, got {len(data)}")
    magic, reserved, seq, step, piece, nbytes = _FRAME.unpack(data)
    if magic != FRAME_MAGIC or reserved != 0:
        raise ProtocolError("bad frame header magic")
    if nbytes > max_bytes:
        raise ProtocolError(f"frame of {nbytes} bytes exceeds the {max_bytes}-byte cap")
    return FrameHeader(seq, step, piece, nbytes)


@dataclass(frozen=True)
class StateRequest:
    seq: int
    key: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class StateReply:
    status: int
    seq: int
    nbytes: int


def encode_state_request(r: StateRequest) -> bytes:
    return _STATE_REQ.pack(STATE_REQ_MAGIC, r.key, r.seq, r.offset, r.nbytes)


def decode_state_request(data: bytes | bytearray | memoryview, max_bytes: int) -> StateRequest:
    if len(data) != STATE_REQ_SIZE:
        raise ProtocolError(f"state request must be {STATE_REQ_SIZE} bytes, got {len(data)}")
    magic, key, seq, offset, nbytes = _STATE_REQ.unpack(data)
    if magic != STATE_REQ_MAGIC:
        raise ProtocolError("bad state request magic")
    if nbytes > max_bytes:
        raise ProtocolError(f"state request of {nbytes} bytes exceeds the {max_bytes}-byte cap")
    return StateRequest(seq, key, offset, nbytes)


def encode_state_reply(r: StateReply) -> bytes:
    return _STATE_REP.pack(STATE_REP_MAGIC, r.status, r.seq, r.nbytes)


def decode_state_reply(data: bytes | bytearray | memoryview, max_bytes: int) -> StateReply:
    if len(data) != STATE_REP_SIZE:
        raise ProtocolError(f"state reply must be {STATE_REP_SIZE} bytes, got {len(data)}")
    magic, status, seq, nbytes = _STATE_REP.unpack(data)
    if magic != STATE_REP_MAGIC or status not in (STATE_OK, STATE_NOT_SERVING, STATE_BAD_REQUEST):
        raise ProtocolError("bad state reply header")
    if nbytes > max_bytes:
        raise ProtocolError(f"state reply of {nbytes} bytes exceeds the {max_bytes}-byte cap")
    return StateReply(status, seq, nbytes)

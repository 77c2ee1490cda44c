"""Fixed-layout byte formats of the data plane (little-endian), as pure encode/decode functions.

* Handshake (connector -> listener, 32 bytes): magic, connector peer id, world revision,
  connection index, reserved.
* Ack (listener -> connector, 16 bytes): magic, listener peer id, so the connector knows it
  reached the peer it meant (an address can be reused by a restarted peer).
* Frame header (32 bytes) before every payload: magic, op sequence, step, piece, payload length.

Decoders raise ``ProtocolError`` for any defect and never anything else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pccl.errors import ProtocolError

HANDSHAKE_MAGIC = b"PCCLDAT1"
ACK_MAGIC = b"PCCLACK1"
FRAME_MAGIC = 0x46434350  # b"PCCF" read as little-endian u32

_HANDSHAKE = struct.Struct("<8sQQII")
_ACK = struct.Struct("<8sQ")
_FRAME = struct.Struct("<IIQIIQ")

HANDSHAKE_SIZE = _HANDSHAKE.size
ACK_SIZE = _ACK.size
FRAME_SIZE = _FRAME.size
MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class Handshake:
    peer_id: int
    revision: int
    index: int


@dataclass(frozen=True)
class FrameHeader:
    seq: int
    step: int
    piece: int
    nbytes: int


def encode_handshake(h: Handshake) -> bytes:
    return _HANDSHAKE.pack(HANDSHAKE_MAGIC, h.peer_id, h.revision, h.index, 0)


def decode_handshake(data: bytes) -> Handshake:
    if len(data) != HANDSHAKE_SIZE:
        raise ProtocolError(f"handshake must be {HANDSHAKE_SIZE} bytes, got {len(data)}")
    magic, pid, rev, index, reserved = _HANDSHAKE.unpack(data)
    if magic != HANDSHAKE_MAGIC:
        raise ProtocolError("bad handshake magic (not a pccl data connection, or another version)")
    if index >= MAX_CONNECTIONS or reserved != 0:
        raise ProtocolError(f"bad handshake fields (index {index}, reserved {reserved})")
    return Handshake(pid, rev, index)


def encode_ack(peer_id: int) -> bytes:
    return _ACK.pack(ACK_MAGIC, peer_id)


def decode_ack(data: bytes) -> int:
    if len(data) != ACK_SIZE:
        raise ProtocolError(f"ack must be {ACK_SIZE} bytes, got {len(data)}")
    magic, pid = _ACK.unpack(data)
    if magic != ACK_MAGIC:
        raise ProtocolError("bad ack magic")
    return pid


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

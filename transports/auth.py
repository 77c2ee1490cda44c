"""Mutual HMAC challenge-response over a shared secret: the pure pieces (no sockets, no clocks).

How it works
1. The initiator (a peer dialing the master, a connector dialing a data port) sends a fresh
   32-byte random nonce. The responder answers with its own fresh nonce and its proof.
2. A proof is HMAC-SHA256(secret, domain, role, transcript): the transcript is everything said so
   far (both nonces; on data links also the handshake and the listener's header), each part
   length-prefixed so no two transcripts encode alike. The role differs per side, so a proof can
   never be reflected back as the other side's; both nonces are fresh, so a recorded exchange is
   useless later (replay); the domain separates the control channel from data connections.
3. The initiator checks the responder's proof before it sends its own: a responder that does not
   know the secret gets nothing from a careful initiator but a proof bound to nonces never reused.
   The responder admits the initiator only after checking the initiator's proof.
4. Proofs are compared with ``hmac.compare_digest``. The secret never crosses the wire and never
   appears in an error message.

This authenticates connection setup only: nothing afterwards is encrypted or signed.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Callable

from pccl.errors import AuthenticationFailed

NONCE_SIZE = 32
PROOF_SIZE = 32

#: domains (what is being authenticated)
CONTROL = b"pccl-control-v1"
DATA = b"pccl-data-v1"
#: roles
INITIATOR = b"initiator"
RESPONDER = b"responder"

_LEN = struct.Struct("<I")


def new_nonce() -> bytes:
    """A fresh random nonce from the OS's CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def proof(secret: bytes, domain: bytes, role: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over the domain, the role and the length-prefixed transcript parts."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for p in (domain, role) + parts:
        mac.update(_LEN.pack(len(p)))
        mac.update(p)
    return mac.digest()


def check(secret: bytes, domain: bytes, role: bytes, got: bytes, *parts: bytes) -> bool:
    """Whether ``got`` is the proof of ``role`` over these parts (constant-time comparison)."""
    if type(got) is not bytes or len(got) != PROOF_SIZE:
        return False
    return hmac.compare_digest(got, proof(secret, domain, role, *parts))


class Initiator:
    """The side that speaks first: ``nonce`` goes out, then :meth:`answer` the responder's challenge."""

    def __init__(self, secret: bytes, domain: bytes, nonce: bytes | None = None) -> None:
        self._secret = secret
        self.domain = domain
        self.nonce = new_nonce() if nonce is None else nonce

    def answer(self, their_nonce: bytes, their_proof: bytes, *context: bytes) -> bytes:
        """Check the responder's proof and return this side's. Raises AuthenticationFailed if the
        responder did not prove the secret (wrong secret on one of the two sides)."""
        if type(their_nonce) is not bytes or len(their_nonce) != NONCE_SIZE:
            raise AuthenticationFailed("malformed challenge (the nonce must be 32 bytes)")
        parts = (self.nonce, their_nonce) + context
        if not check(self._secret, self.domain, RESPONDER, their_proof, *parts):
            raise AuthenticationFailed("the other side did not prove the shared secret "
                                       "(wrong secret on one of the two sides)")
        return proof(self._secret, self.domain, INITIATOR, *parts)


class Responder:
    """The side that answers: built from the initiator's nonce, sends ``nonce`` and ``proof``,
    then :meth:`verify` the initiator's proof."""

    def __init__(self, secret: bytes, domain: bytes, their_nonce: bytes, *context: bytes,
                 nonce_source: Callable[[], bytes] = new_nonce) -> None:
        if type(their_nonce) is not bytes or len(their_nonce) != NONCE_SIZE:
            raise AuthenticationFailed("malformed hello (the nonce must be 32 bytes)")
        self._secret = secret
        self.domain = domain
        self.nonce = nonce_source()
        self._parts = (their_nonce, self.nonce) + context
        self.proof = proof(secret, domain, RESPONDER, *self._parts)

    def verify(self, their_proof: bytes) -> bool:
        return check(self._secret, self.domain, INITIATOR, their_proof, *self._parts)

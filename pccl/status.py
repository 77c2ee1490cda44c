"""``pccl status``: ask a master for its view, over a short-lived DEALER socket.

With a secret (``secret=``, else ``PCCL_SECRET``) the query first proves it, as peers do
(``transports.auth``): hello, check the master's proof, send ours, then the query.
"""
from __future__ import annotations

import time

import zmq

from pccl.config import resolve
from pccl.errors import AuthenticationFailed, MasterUnreachable
from pccl.transports import auth
from pccl.transports import messages as m


def _recv(sock: zmq.Socket, master: str, deadline: float, max_size: int) -> object:
    left = deadline - time.monotonic()
    if left <= 0 or not sock.poll(int(left * 1000) + 1):
        raise MasterUnreachable(f"the master at {master} did not answer in time")
    reply = m.decode(sock.recv(), max_size)
    if isinstance(reply, m.AuthFailed):
        raise AuthenticationFailed(f"authentication with the master failed: {reply.reason}")
    return reply


def query_status(master: str, timeout: float = 5.0, secret: str | bytes | None = None) -> str:
    """Return the master's status text. Raises MasterUnreachable if it does not answer in time,
    AuthenticationFailed if the secrets (or the lack of one) do not match."""
    config = resolve(None, secret)
    key = config.secret
    deadline = time.monotonic() + timeout
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_control_message)
    try:
        sock.connect(f"tcp://{master}")
        if key is not None:
            initiator = auth.Initiator(key, auth.CONTROL)
            sock.send(m.encode(m.AuthHello(nonce=initiator.nonce)))
            challenge = _recv(sock, master, deadline, config.max_control_message)
            if not isinstance(challenge, m.AuthChallenge):
                raise AuthenticationFailed(f"authentication with the master failed: it answered with "
                                           f"{type(challenge).__name__} without proving the shared secret")
            try:
                mine = initiator.answer(challenge.nonce, challenge.proof)
            except AuthenticationFailed:
                raise AuthenticationFailed("authentication with the master failed: wrong secret") from None
            sock.send(m.encode(m.AuthProof(proof=mine)))
        sock.send(m.encode(m.StatusQuery(req=1)))
        reply = _recv(sock, master, deadline, config.max_control_message)
        if not isinstance(reply, m.StatusReply):
            raise MasterUnreachable(f"unexpected answer from {master}: {type(reply).__name__}")
        return reply.text
    finally:
        sock.close(0)
        ctx.term()

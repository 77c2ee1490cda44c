"""``pccl status``: ask a master for its view, over a short-lived DEALER socket."""
from __future__ import annotations

import zmq

from pccl.errors import MasterUnreachable
from pccl.transports import messages as m


def query_status(master: str, timeout: float = 5.0) -> str:
    """Return the master's status text. Raises MasterUnreachable if it does not answer in time."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{master}")
        sock.send(m.encode(m.StatusQuery(req=1)))
        if not sock.poll(int(timeout * 1000)):
            raise MasterUnreachable(f"the master at {master} did not answer within {timeout}s")
        reply = m.decode(sock.recv())
        if not isinstance(reply, m.StatusReply):
            raise MasterUnreachable(f"unexpected answer from {master}: {type(reply).__name__}")
        return reply.text
    finally:
        sock.close(0)
        ctx.term()

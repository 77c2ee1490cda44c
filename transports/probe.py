"""Bandwidth probes for optimize_topology: a timed bulk send, acknowledged by the receiver.

The prober opens K connections (handshake kind PROBE) and sends for ``seconds`` on each, then
half-closes; the target counts what arrived on each and answers with the count (8 bytes). The
bandwidth is the acknowledged bytes over the time until the last answer, so buffered bytes that
never arrived are not counted.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np

from pccl.config import Config
from pccl.errors import PcclError, PeerFailure
from pccl.transports import framing
from pccl.transports.links import connect, recv_exact

_COUNT = struct.Struct("<Q")
_CHUNK = 1 << 20


def sink(sock: socket.socket, hs: framing.Handshake, config: Config) -> None:
    """Target side (listener handler): count bytes until the prober half-closes, answer the count."""
    limit = time.monotonic() + config.probe_seconds * 4 + config.request_timeout
    buf = bytearray(_CHUNK)
    got = 0
    try:
        sock.settimeout(config.request_timeout)
        while time.monotonic() < limit:
            k = sock.recv_into(buf)
            if k == 0:
                sock.sendall(_COUNT.pack(got))
                return
            got += k
    except OSError:
        pass


def measure(host: str, port: int, my_id: int, target: int, seconds: float, connections: int,
            config: Config) -> float:
    """Bytes per second from this peer to ``target`` over ``connections`` parallel connections.

    Raises PeerFailure if the target cannot be reached or does not acknowledge.
    """
    payload = np.zeros(_CHUNK, dtype=np.uint8)
    counts = [0] * connections
    errors: list[BaseException] = []
    t0 = time.monotonic()
    stop_at = t0 + seconds

    def one(i: int) -> None:
        try:
            s = connect(host, port, my_id, target, 0, i, config, kind=framing.KIND_PROBE)
        except PcclError as exc:
            errors.append(exc)
            return
        try:
            s.settimeout(config.request_timeout)
            view = memoryview(payload)
            while time.monotonic() < stop_at:
                s.sendall(view)
            s.shutdown(socket.SHUT_WR)
            ack = bytearray(_COUNT.size)
            recv_exact(s, memoryview(ack))
            counts[i] = _COUNT.unpack(ack)[0]
        except (OSError, PcclError) as exc:
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=one, args=(i,), name=f"pccl-probe-{target}-{i}", daemon=True)
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 2 * config.request_timeout + config.connect_timeout)
    elapsed = time.monotonic() - t0
    if errors or any(t.is_alive() for t in threads):
        raise PeerFailure(f"bandwidth probe to peer {target} failed: {errors[0] if errors else 'timed out'}")
    return sum(counts) / max(elapsed, 1e-9)

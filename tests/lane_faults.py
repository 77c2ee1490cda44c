"""Shared harness of the job tests over socket pairs (test_executor, test_group_exec): inject a
receive failure, then settle the jobs the way the communicator and the master would."""
from __future__ import annotations

import threading
import time
from typing import Callable

from pccl.errors import PeerFailure


def failing_recv(owner: dict[int, int], fail: tuple[int, int] | None, real: Callable):
    """A ``recv_exact`` stand-in that counts calls per rank (``owner``: socket id → rank) and
    raises PeerFailure at call ``fail[1]`` of rank ``fail[0]``. Returns (function, counts)."""
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def faulty(sock, view):
        r = owner.get(id(sock))
        with lock:
            calls[r] = calls.get(r, 0) + 1
            hit = fail is not None and r == fail[0] and calls[r] == fail[1]
        if hit:
            raise PeerFailure("injected")
        return real(sock, view)

    return faulty, calls


def settle(jobs: list, seconds: float, before_join: Callable[[], None] = lambda: None) -> list[BaseException]:
    """Wait for every job (``seconds`` each); on the first error abort them all (what the
    master's abort verdict does); join every job; restore the inputs after an error. Returns the
    errors the waits raised."""
    errors: list[BaseException] = []
    for j in jobs:
        try:
            j.wait(time.monotonic() + seconds)
        except Exception as exc:  # noqa: BLE001 - returned to the test, which checks them
            errors.append(exc)
            for other in jobs:
                other.abort(PeerFailure("aborted"))
    before_join()
    for j in jobs:
        assert j.join(10)
    if errors:
        for j in jobs:
            j.restore()
    return errors

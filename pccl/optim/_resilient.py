"""The fault-tolerant loop shared by the optimizers: membership, shared-state sync, retried reduces.

How it works
1. ``boundary`` runs at a point where every peer of the group is aligned and no collective is in
   flight: pending peers → ``update_topology()`` → ``sync_shared_state``. A sync that fails with
   ``pccl.RETRYABLE`` (a peer died, or another peer waits in ``update_topology`` because it saw a
   newcomer this peer did not see yet) is followed by ``update_topology()`` and retried, so peers
   that disagreed about "pending" meet again at the same sync.
2. ``reduce_avg`` all-reduces (AVG) a list of flat float tensors. It prefers
   ``comm.all_reduce_many`` (a window of async ops that itself retries failed tensors after
   ``update_topology(admit=False)``); without it, one ``all_reduce_async`` per tensor with
   distinct tags, 16 in flight. If the call still fails with ``RETRYABLE``, or if the tensors were
   reduced over different worlds (a peer died between two of them), every tensor is refilled
   from its source by ``fill()`` and the whole list is reduced again over one world, so the
   result is the mean over one membership on every survivor (ALGORITHMS §7 T6).
3. Every loop is bounded by ``RetryPolicy.attempts`` and ``RetryPolicy.seconds``; the last error
   is raised when either is spent. A master restart (``MasterLost``, retryable) does not count
   against ``attempts``: the retry's ``update_topology()`` waits for the reconnection and re-forms
   the group, and the communicator's own reconnect window bounds it (then MasterUnreachable). ``InvalidUsage`` (e.g. a quantization the group cannot do, or
   mismatched shapes across peers) is a configuration error and propagates at once.
4. ``Background`` runs ``reduce_avg`` on an owned thread (async DiLoCo, streaming overlap); its
   ``wait()`` re-raises the thread's exception in the caller.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pccl.enums import Algorithm, Quantization, ReduceOp, SyncStrategy
from pccl.errors import RETRYABLE, MasterLost, PcclTimeout

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 16


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of every fault-tolerant loop: at most ``attempts`` tries and ``seconds`` in total."""

    attempts: int = 5
    seconds: float = 900.0

    def __post_init__(self) -> None:
        if type(self.attempts) is not int or self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be an int >= 1")
        if not self.seconds > 0:
            raise ValueError("RetryPolicy.seconds must be > 0")


@dataclass(frozen=True)
class ReduceResult:
    """What one retried reduce did: bytes of the successful attempt, its world, attempts used."""

    tx_bytes: int
    rx_bytes: int
    world_size: int
    attempts: int
    seconds: float


class _MixedWorlds(RuntimeError):
    """Tensors of one reduce were averaged over different memberships (the topology is updated)."""


class _Budget:
    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy, self.what = policy, what
        self.start = time.monotonic()
        self.attempt = 0
        self.master_losses = 0  # retries after MasterLost: bounded by seconds, not by attempts

    def next(self, error: BaseException | None) -> None:
        """Count one more attempt; raise ``error`` when the budget is spent."""
        self.attempt += 1
        if self.attempt == 1:
            return
        if isinstance(error, MasterLost):
            self.master_losses += 1
        spent = time.monotonic() - self.start
        if self.attempt - self.master_losses > self.policy.attempts or spent > self.policy.seconds:
            log.warning("%s: giving up after %d attempts in %.1f s: %s", self.what, self.attempt - 1, spent, error)
            if error is None:
                raise PcclTimeout(f"{self.what}: retry budget spent")
            raise error
        log.info("%s: attempt %d after %s", self.what, self.attempt, error)


def _supports_admit(comm: Any) -> bool:
    try:
        return "admit" in inspect.signature(comm.update_topology).parameters
    except (TypeError, ValueError):
        return False


def update_topology(comm: Any, admit: bool, policy: RetryPolicy) -> None:
    """``comm.update_topology`` retried on PeerFailure (a neighbour died while links were opened).

    ``admit=False`` keeps newcomers pending (a retry inside a step); a communicator without the
    ``admit`` argument admits them anyway.
    """
    budget = _Budget(policy, "update_topology")
    error: BaseException | None = None
    while True:
        budget.next(error)
        try:
            if not admit and _supports_admit(comm):
                comm.update_topology(admit=False)
            else:
                comm.update_topology()
            return
        except RETRYABLE as exc:
            error = exc


def boundary(comm: Any, state: Any, policy: RetryPolicy, check_pending: bool = True,
             strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR, timeout: float | None = None) -> tuple[Any, set[int]]:
    """Admit pending peers (when ``check_pending``), then sync ``state`` (revision + 1) with retries.

    Returns (SyncInfo, peer ids that entered the topology during this call). Call it only where
    every peer of the group calls it too and no collective is in flight.
    """
    before = set(comm.topology)
    if check_pending and comm.are_peers_pending():
        update_topology(comm, True, policy)
    info = sync(comm, state, policy, strategy, timeout)
    return info, set(comm.topology) - before


def sync(comm: Any, state: Any, policy: RetryPolicy, strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
         timeout: float | None = None) -> Any:
    """One shared-state sync at revision + 1, retried after ``update_topology()`` on RETRYABLE."""
    if state.synced_revision is not None:
        state.revision = state.synced_revision + 1
    budget = _Budget(policy, "sync_shared_state")
    error: BaseException | None = None
    while True:
        budget.next(error)
        try:
            return comm.sync_shared_state(state, strategy=strategy, timeout=timeout)
        except RETRYABLE as exc:
            error = exc
            update_topology(comm, True, policy)


def _reduce_once(comm: Any, tensors: Sequence[Any], quantization: Quantization, tag_base: int) -> list[Any]:
    many = getattr(comm, "all_reduce_many", None)
    if many is not None:
        # The optimizers' buckets are large and bandwidth-bound: the ring moves the least per peer
        # (and the byte counts in docs/benchmarks.md are the ring's).
        return list(many(list(tensors), op=ReduceOp.AVG, quantization=quantization, max_in_flight=MAX_IN_FLIGHT,
                         tag_base=tag_base, algorithm=Algorithm.RING))
    # Fallback for communicators without all_reduce_many: a window of async ops, distinct tags.
    # Every started op is waited before anything is raised (no op may outlive this call).
    infos: list[Any] = [None] * len(tensors)
    window: list[tuple[int, Any]] = []
    errors: list[BaseException] = []

    def reap(j: int, h: Any) -> None:
        try:
            infos[j] = h.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after every op ended
            errors.append(exc)

    for i, t in enumerate(tensors):
        if len(window) == MAX_IN_FLIGHT:
            reap(*window.pop(0))
        if errors:
            break
        try:
            window.append((i, comm.all_reduce_async(t, op=ReduceOp.AVG, quantization=quantization,
                                                    algorithm=Algorithm.RING, tag=tag_base + i % MAX_IN_FLIGHT)))
        except BaseException as exc:  # noqa: BLE001 - as above
            errors.append(exc)
            break
    for j, h in window:
        reap(j, h)
    if errors:  # a configuration error wins over a retryable one
        raise next((e for e in errors if not isinstance(e, RETRYABLE)), errors[0])
    return infos


def reduce_avg(comm: Any, tensors: Sequence[Any], fill: Callable[[], None], quantization: Quantization,
               policy: RetryPolicy, what: str = "outer all-reduce", tag_base: int = 0) -> ReduceResult:
    """Fill ``tensors`` (``fill()``), all-reduce them in place (AVG) over one world, with retries.

    ``fill`` must be able to rewrite every tensor from its source at any time (it is called
    again before a retry, because the tensors reduced before a failure hold results).
    """
    t0 = time.monotonic()
    budget = _Budget(policy, what)
    error: BaseException | None = None
    while True:
        budget.next(error)
        if isinstance(error, RETRYABLE):
            update_topology(comm, False, policy)  # every survivor saw the same failed op
        fill()
        try:
            infos = _reduce_once(comm, tensors, quantization, tag_base)
        except RETRYABLE as exc:
            error = exc
            continue
        worlds = {i.world_size for i in infos}
        if len(worlds) > 1:  # a peer died between two tensors: redo all over the survivors
            error = _MixedWorlds(f"{what}: tensors reduced over different worlds {sorted(worlds)}")
            continue
        world = worlds.pop() if worlds else comm.world_size
        return ReduceResult(sum(i.tx_bytes for i in infos), sum(i.rx_bytes for i in infos), world,
                            budget.attempt, time.monotonic() - t0)


class Background:
    """``reduce_avg`` on an owned thread. ``wait()`` returns its ReduceResult or re-raises its error.

    Nothing else may touch the tensors until ``wait()`` returned; no other collective,
    ``update_topology`` or ``sync_shared_state`` may run on the communicator meanwhile except
    from this thread.
    """

    def __init__(self, comm: Any, tensors: Sequence[Any], fill: Callable[[], None], quantization: Quantization,
                 policy: RetryPolicy, what: str, tag_base: int = 0) -> None:
        self._result: ReduceResult | None = None
        self._error: BaseException | None = None
        self._policy = policy
        self._thread = threading.Thread(target=self._main, name="pccl-optim-reduce", daemon=True,
                                        args=(comm, tensors, fill, quantization, policy, what, tag_base))
        self._thread.start()

    def _main(self, *args: Any) -> None:
        try:
            self._result = reduce_avg(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> ReduceResult:
        """Join the thread (at most ``timeout`` s, default: the retry policy's seconds + 60)."""
        self._thread.join(self._policy.seconds + 60.0 if timeout is None else timeout)
        if self._thread.is_alive():
            raise PcclTimeout("the background all-reduce is still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

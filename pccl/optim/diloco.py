"""DiLoCo and one-step-delayed (async) DiLoCo over a pccl Communicator (ALGORITHMS.md §1, §3).

How it works (synchronous, one outer step every ``sync_every`` = H calls of ``step()``)
1. ``step()`` runs the inner optimizer. The outer parameters θᵍ (float32, CPU), the outer
   momentum b and the counters (outer step t, global inner step at the last outer step, a flag)
   are keys ``theta/<name>``, ``momentum/<name>``, ``counters`` of a :class:`pccl.SharedState`;
   the inner optimizer state is local (a joiner starts it fresh, §1.5).
2. Outer step: Δ = θᵍ − φ per parameter into flat float32 buckets; all-reduce AVG over one
   membership with retries (``_resilient.reduce_avg``); then ``outer_sgd_`` (§1.2, PyTorch's
   Nesterov convention) on CPU in a fixed order of separate ops; then φ ← θᵍ.
3. Boundary (no collective in flight, every peer at the same point): pending peers →
   ``update_topology()`` → ``sync_shared_state``. In step it moves no bytes (a veteran that
   receives bytes had drifted: it is repaired, counted in ``drift_repairs`` and logged). A
   joiner's constructor runs the same sync, so it receives θᵍ, b, t and starts from φ ← θᵍ.
Delayed (§3): at the end of iteration k the reduce of Δ_{k−1}, running in the background since
the end of iteration k−1, is waited; Δ_k = θᵍ − φ is computed; Δ̄_{k−1} is applied; φ ← θᵍ; the
reduce of Δ_k starts on an owned thread (its buffer is never touched until it is waited).
Joins happen at the start of an iteration (right after launching the reduce): wait the reduce
(its result is applied later), ``update_topology()``, a normal sync (the joiner gets s_k and
trains iteration k like everybody), then after the outer step a second sync: veterans SEND_ONLY,
the joiner RECEIVE_ONLY (it gets s_{k+1}). A veteran that missed the newcomer at the start of the
iteration meets the others at the end of it (before applying), so the sequence of collectives is
the same on every peer. Async with momentum is unstable (§3): a warning says so when
η/(1−μ) > 1.
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from pccl.enums import Quantization, SyncStrategy
from pccl.errors import InvalidUsage
from pccl.optim import _resilient as rs
from pccl.shared_state import SharedState

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 16 << 20


def outer_sgd_(params: Sequence[torch.Tensor], momenta: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               lr: float, momentum: float, nesterov: bool, first: bool) -> None:
    """One outer SGD step in place (ALGORITHMS §1.2, PyTorch convention, dampening 0).

    b ← Δ̄ on the first step, else μ·b + Δ̄; update u = Δ̄ + μ·b (Nesterov) or b; θ ← θ − η·u.
    Every product and sum is a separate op in a fixed order (no fused kernel), so identical
    inputs give identical bytes on every peer. With μ = 0, u = Δ̄ exactly and b ← Δ̄.
    """
    for theta, b, g in zip(params, momenta, grads, strict=True):
        if momentum == 0:
            b.copy_(g)
            u = g
        else:
            if first:
                b.copy_(g)
            else:
                b.mul_(momentum)
                b.add_(g)
            if nesterov:
                u = torch.mul(b, momentum)
                u.add_(g)
            else:
                u = b
        step = torch.mul(u, lr)
        theta.sub_(step)


@dataclass(frozen=True)
class OuterStepStats:
    """One outer step (or fragment event): the all-reduce's payload bytes and the boundary sync's."""

    outer_step: int
    fragment: int
    world_size: int
    tx_bytes: int
    rx_bytes: int
    attempts: int
    reduce_seconds: float
    sync_tx_bytes: int
    sync_rx_bytes: int


class FlatBuffer:
    """One flat CPU tensor with a view per parameter and buckets split at parameter boundaries."""

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, bucket_bytes: int) -> None:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        self.flat = torch.zeros(sum(sizes), dtype=dtype)
        self.views: list[torch.Tensor] = []
        self.buckets: list[torch.Tensor] = []
        off, start = 0, 0
        item = self.flat.element_size()
        for shape, n in zip(shapes, sizes, strict=True):
            self.views.append(self.flat[off:off + n].view(shape))
            off += n
            if (off - start) * item >= bucket_bytes:
                self.buckets.append(self.flat[start:off])
                start = off
        if off > start or not self.buckets:
            self.buckets.append(self.flat[start:off])


class _OuterBase:
    """Parameters, shared state, retries and model copies common to DiLoCo and StreamingDiLoCo."""

    def __init__(self, model: torch.nn.Module, inner_optimizer: Any, comm: Any, sync_every: int, outer_lr: float,
                 outer_momentum: float, nesterov: bool, quantization: Quantization, retry: rs.RetryPolicy | None,
                 bucket_bytes: int, outer_dtype: torch.dtype | None, extra_counters: int) -> None:
        if type(sync_every) is not int or sync_every < 1:
            raise InvalidUsage("sync_every must be an int >= 1")
        if not outer_lr > 0 or not 0 <= outer_momentum < 1:
            raise InvalidUsage("outer_lr must be > 0 and outer_momentum in [0, 1)")
        try:
            self.quantization = Quantization(quantization)
        except ValueError as exc:
            raise InvalidUsage(str(exc)) from exc
        self.model, self.inner, self.comm = model, inner_optimizer, comm
        self.sync_every = sync_every
        self.outer_lr, self.outer_momentum, self.nesterov = float(outer_lr), float(outer_momentum), bool(nesterov)
        self.retry = retry or rs.RetryPolicy()
        self.bucket_bytes = bucket_bytes
        self.dtype = outer_dtype or torch.float32
        if self.dtype not in (torch.float32, torch.float64):
            raise InvalidUsage("outer_dtype must be torch.float32 or torch.float64")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise InvalidUsage("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.theta = [p.detach().to("cpu", self.dtype).clone().contiguous() for p in self.params]
        self.momentum = [torch.zeros_like(t) for t in self.theta]
        #: [outer steps, global inner step at the last boundary, delayed-mode flag, 0, extra...]
        self.counters = torch.zeros(4 + extra_counters, dtype=torch.int64)
        keys: dict[str, Any] = {"counters": self.counters}
        for n, t, b in zip(self.names, self.theta, self.momentum, strict=True):
            keys[f"theta/{n}"] = t
            keys[f"momentum/{n}"] = b
        self.state = SharedState(keys, revision=0)
        self.drift_repairs = 0
        self.last_outer_step: OuterStepStats | None = None
        self._synced_once = False

    # ---------------------------------------------------------------- torch.optim-like surface
    @property
    def param_groups(self) -> list:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @property
    def last_outer_step_bytes(self) -> tuple[int, int]:
        """(tx, rx) payload bytes of the last outer all-reduce (0, 0 before the first)."""
        s = self.last_outer_step
        return (s.tx_bytes, s.rx_bytes) if s else (0, 0)

    @property
    def outer_step(self) -> int:
        return int(self.counters[0])

    def theta_digest(self) -> str:
        """SHA-256 of θᵍ ‖ b (parameter order), to compare peers."""
        import hashlib

        h = hashlib.sha256()
        for t in self.theta + self.momentum:
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    # ---------------------------------------------------------------- helpers
    def _inner_step(self, closure: Callable[[], Any] | None) -> Any:
        return self.inner.step() if closure is None else self.inner.step(closure)

    def _load_model(self, idx: Sequence[int] | None = None) -> None:
        with torch.no_grad():
            for i in range(len(self.params)) if idx is None else idx:
                self.params[i].copy_(self.theta[i])

    def _delta_into(self, views: Sequence[torch.Tensor], idx: Sequence[int]) -> None:
        for v, i in zip(views, idx, strict=True):
            torch.sub(self.theta[i], self.params[i].detach().to("cpu", self.dtype), out=v)

    def _sync(self, check_pending: bool = True, strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
              timeout: float | None = None) -> tuple[Any, set[int]]:
        info, new = rs.boundary(self.comm, self.state, self.retry, check_pending, strategy, timeout)
        if self._synced_once and info.rx_bytes and strategy is not SyncStrategy.RECEIVE_ONLY:
            self.drift_repairs += 1
            log.warning("peer %s: shared state drifted and was repaired (%d bytes received at revision %d)",
                        getattr(self.comm, "peer_id", "?"), info.rx_bytes, info.revision)
        self._synced_once = True
        return info, new

    def _stats(self, res: rs.ReduceResult, fragment: int, sync: Any) -> OuterStepStats:
        return OuterStepStats(self.outer_step, fragment, res.world_size, res.tx_bytes, res.rx_bytes, res.attempts,
                              res.seconds, getattr(sync, "tx_bytes", 0), getattr(sync, "rx_bytes", 0))

    def _base_state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "theta": [t.clone() for t in self.theta],
                "momentum": [b.clone() for b in self.momentum], "counters": self.counters.clone(),
                "revision": self.state.revision, "inner": copy.deepcopy(self.inner.state_dict())}

    def _base_load(self, sd: dict[str, Any]) -> None:
        if list(sd["names"]) != self.names:
            raise InvalidUsage("state_dict parameter names differ from this model's")
        for dst, src in zip(self.theta + self.momentum, list(sd["theta"]) + list(sd["momentum"]), strict=True):
            dst.copy_(src)
        self.counters.copy_(sd["counters"])
        self.state.revision = int(sd["revision"])
        self.state.synced_revision = None  # the next sync may start at the checkpoint's revision
        self.inner.load_state_dict(sd["inner"])
        self._load_model()


class DiLoCo(_OuterBase):
    """DiLoCo (``delayed=False``) or one-step-delayed async DiLoCo (``delayed=True``).

    ``DiLoCo(model, inner_optimizer, comm, sync_every=H, outer_lr=0.7, outer_momentum=0.9,
    nesterov=True, quantization=Quantization.NONE, delayed=False)``; the training loop stays
    ``loss.backward(); opt.step(); opt.zero_grad()``. The constructor syncs the shared state, so
    every peer of the group (or a joiner, with the group's next outer step) must construct it at
    the same point. ``retry`` bounds every retry loop; ``bucket_bytes`` is the all-reduce bucket
    size; ``outer_dtype`` (default float32) is the dtype of θᵍ, b and Δ.

    Raises what the communicator raises once retries are spent: RETRYABLE errors after
    ``retry.attempts`` or ``retry.seconds``, InvalidUsage at once (configuration errors, e.g. a
    quantization the group cannot run), PcclTimeout, MasterUnreachable, Kicked.
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer: Any, comm: Any, sync_every: int = 500,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 quantization: Quantization = Quantization.NONE, delayed: bool = False, *,
                 retry: rs.RetryPolicy | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 outer_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, inner_optimizer, comm, sync_every, outer_lr, outer_momentum, nesterov, quantization,
                         retry, bucket_bytes, outer_dtype, 0)
        self.delayed = bool(delayed)
        if self.delayed and self.outer_lr / (1.0 - self.outer_momentum) > 1.0:
            warnings.warn(f"async (delayed) DiLoCo with outer_lr/(1-outer_momentum) = "
                          f"{self.outer_lr / (1.0 - self.outer_momentum):.3g} > 1 is unstable with a one-step-stale "
                          "pseudo-gradient (ALGORITHMS.md §3); use outer_momentum=0, outer_lr <= 1",
                          RuntimeWarning, stacklevel=2)
        shapes = [t.shape for t in self.theta]
        self._all = list(range(len(self.params)))
        self._work = FlatBuffer(shapes, self.dtype, bucket_bytes)  # the buffer being reduced
        self._src = FlatBuffer(shapes, self.dtype, bucket_bytes) if self.delayed else None  # Δ_k kept for retries
        self._local = 0
        self._bg: rs.Background | None = None
        self._stale: rs.ReduceResult | None = None  # delayed: a reduced Δ̄ in _work not applied yet
        self._second: SyncStrategy | None = None  # delayed: the second sync of a join is due
        self._serviced = False  # delayed: this iteration's join point was handled
        info, _ = self._sync()
        self._load_model()
        if self.delayed and int(self.counters[2]) == 1:
            # joined mid-run: the veterans apply the in-flight result at the end of this iteration,
            # then this peer receives their θᵍ in the second (receive-only) sync
            self._second = SyncStrategy.RECEIVE_ONLY
            self._serviced = True
        self.last_sync = info

    @property
    def global_step(self) -> int:
        """Inner steps of the group so far (the LR schedule's step; shared through ``counters``)."""
        return int(self.counters[1]) + self._local

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One inner step; every ``sync_every`` calls also the outer step. Returns the closure's loss."""
        loss = self._inner_step(closure)
        self._local += 1
        if self._local >= self.sync_every:
            self._local = 0
            if self.delayed:
                self._outer_delayed()
            else:
                self._outer_sync()
        return loss

    # ---------------------------------------------------------------- synchronous
    def _outer_sync(self) -> None:
        res = rs.reduce_avg(self.comm, self._work.buckets, lambda: self._delta_into(self._work.views, self._all),
                            self.quantization, self.retry)
        outer_sgd_(self.theta, self.momentum, self._work.views, self.outer_lr, self.outer_momentum, self.nesterov,
                   first=int(self.counters[0]) == 0)
        self.counters[0] += 1
        self.counters[1] += self.sync_every
        info, _ = self._sync()
        self._load_model()
        self.last_sync = info
        self.last_outer_step = self._stats(res, 0, info)

    # ---------------------------------------------------------------- delayed (async)
    def _join_point(self) -> None:
        """Start of an iteration: wait the reduce in flight, admit newcomers, sync them s_k."""
        if self._bg is not None:
            self._stale, self._bg = self._bg.wait(), None
        before = set(self.comm.topology)
        rs.update_topology(self.comm, True, self.retry)
        if set(self.comm.topology) - before:
            self.counters[2] = 1 if self._stale is not None else 0
            self.last_sync, _ = self._sync(check_pending=False)
            if self._stale is not None:
                self._second = SyncStrategy.SEND_ONLY

    def _outer_delayed(self) -> None:
        if self._bg is not None:
            self._stale, self._bg = self._bg.wait(), None
        if not self._serviced and self.comm.are_peers_pending():
            self._join_point()  # a peer saw the newcomer at the start of this iteration; meet it here
        self._serviced = False
        src = self._src
        assert src is not None
        self._delta_into(src.views, self._all)  # Δ_k = s_k − φ
        res = self._stale
        if res is not None:
            outer_sgd_(self.theta, self.momentum, self._work.views, self.outer_lr, self.outer_momentum,
                       self.nesterov, first=int(self.counters[0]) == 0)
            self.counters[0] += 1
            self._stale = None
        self.counters[1] += self.sync_every
        self.counters[2] = 0
        if self._second is not None:
            strategy, self._second = self._second, None
            self.last_sync, _ = self._sync(check_pending=False, strategy=strategy, timeout=self.retry.seconds)
        self._load_model()
        if res is not None:
            self.last_outer_step = self._stats(res, 0, self.last_sync)
        self.counters[2] = 1  # a reduce is in flight from here on
        work = self._work
        self._bg = rs.Background(self.comm, work.buckets, lambda: work.flat.copy_(src.flat), self.quantization,
                                 self.retry, "delayed outer all-reduce")
        if self.comm.are_peers_pending():
            self._join_point()
            self._serviced = True

    def finish(self) -> None:
        """Delayed mode: wait the reduce in flight and apply it (call before evaluating θᵍ at the
        end of training; every peer must call it). No-op in synchronous mode."""
        if self._bg is not None:
            self._stale, self._bg = self._bg.wait(), None
        if self._stale is not None:
            res, self._stale = self._stale, None
            outer_sgd_(self.theta, self.momentum, self._work.views, self.outer_lr, self.outer_momentum,
                       self.nesterov, first=int(self.counters[0]) == 0)
            self.counters[0] += 1
            self.counters[2] = 0
            self._load_model()
            self.last_outer_step = self._stats(res, 0, None)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """θᵍ, b, counters, revision, inner optimizer state, inner steps since the last outer step;
        in delayed mode the reduce in flight is waited and its result saved as ``pending_delta``."""
        sd = self._base_state_dict()
        sd["local_steps"] = self._local
        if self._bg is not None:
            self._stale, self._bg = self._bg.wait(), None
        sd["pending_delta"] = self._work.flat.clone() if self._stale is not None else None
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (every peer of the group should load the same one)."""
        if self._bg is not None:
            self._bg.wait()
            self._bg = None
        self._base_load(sd)
        self._local = int(sd.get("local_steps", 0))
        pending = sd.get("pending_delta")
        self._stale = None
        if pending is not None and self.delayed:
            self._work.flat.copy_(pending)
            self._stale = rs.ReduceResult(0, 0, getattr(self.comm, "world_size", 1), 0, 0.0)

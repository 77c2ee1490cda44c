"""Streaming DiLoCo over a pccl Communicator (ALGORITHMS.md §2).

How it works (global inner step t = 1, 2, …, identical on every peer)
1. Fragments: the trainable parameters, in the model's registration order, are cut into P
   contiguous groups of roughly equal element counts, a module's parameters kept together
   (``partition``); the cut depends only on the parameter names, their order and sizes, so every
   peer derives the same fragments.
2. Schedule (§2.2): fragment p has offset o_p = (p+1)·H/P (P must divide H) and starts an event
   at every t ≥ o_p with (t − o_p) mod H = 0, so one fragment event every H/P steps in round-robin
   order, each fragment once per H steps. The overlap τ must satisfy τ < H/P: at most one
   fragment is in flight.
3. Event of fragment p at t_s (§2.3): Δ_p = θᵍ_p − φ_p into flat buckets; the AVG all-reduce runs
   in the background (τ > 0, on an owned thread, from a kept copy of Δ_p) or blocking (τ = 0).
   After inner step t_s + τ: wait; per-fragment outer Nesterov (own momentum b_p and own step
   counter, ``diloco.outer_sgd_``); merge φ_p ← α·φ_p + (1−α)·θᵍ_p (``merge_``; α = 0 copies θᵍ_p).
4. Boundary after every completed event (nothing in flight there, as τ < H/P): pending peers →
   ``update_topology()`` → ``sync_shared_state`` of θᵍ, b and the counters (t and every
   fragment's outer step). A joiner gets them in its constructor, sets φ ← θᵍ and continues at t.
With P = 1, τ = 0, α = 0 the sequence of operations is DiLoCo's, byte for byte (ALGORITHMS §7 S1).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from pccl.enums import Quantization
from pccl.errors import InvalidUsage
from pccl.optim import _resilient as rs
from pccl.optim.diloco import DEFAULT_BUCKET_BYTES, FlatBuffer, _OuterBase, outer_sgd_


def partition(sizes: Sequence[int], fragments: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Cut parameter indices 0..n−1 (sizes in elements, in model order) into ``fragments``
    contiguous non-empty groups of roughly equal total size. With ``names``, consecutive
    parameters of one module (same name up to the last '.', e.g. a layer's weight and bias) stay
    together when there are at least ``fragments`` such modules. Pure and deterministic."""
    n = len(sizes)
    if type(fragments) is not int or fragments < 1:
        raise InvalidUsage("fragments must be an int >= 1")
    if fragments > n:
        raise InvalidUsage(f"fragments={fragments} exceeds the number of trainable parameters ({n})")
    units: list[list[int]] = []
    for i in range(n):
        prefix = names[i].rpartition(".")[0] if names is not None else None
        if units and prefix is not None and names[units[-1][-1]].rpartition(".")[0] == prefix:
            units[-1].append(i)
        else:
            units.append([i])
    if len(units) < fragments:
        units = [[i] for i in range(n)]
    weights = [sum(sizes[i] for i in u) for u in units]
    total = sum(weights)
    groups: list[list[int]] = [[] for _ in range(fragments)]
    acc, p = 0, 0
    for k, (u, w) in enumerate(zip(units, weights, strict=True)):
        # move on to the next group when this one reached its share, or when every remaining
        # unit is needed to keep the remaining groups non-empty
        if groups[p] and p < fragments - 1 and (acc + w / 2 > total * (p + 1) / fragments
                                                 or len(units) - k < fragments - p):
            p += 1
        groups[p].extend(u)
        acc += w
    return groups


def offsets(sync_every: int, fragments: int) -> list[int]:
    """o_p = (p+1)·H/P (§2.2). Raises InvalidUsage unless P divides H."""
    if sync_every % fragments:
        raise InvalidUsage(f"fragments={fragments} must divide sync_every={sync_every}")
    return [(p + 1) * sync_every // fragments for p in range(fragments)]


def events_at(t: int, sync_every: int, offs: Sequence[int]) -> list[int]:
    """Fragments whose event is at global inner step t (t ≥ 1)."""
    return [p for p, o in enumerate(offs) if t >= o and (t - o) % sync_every == 0]


def check_overlap(sync_every: int, fragments: int, overlap: int) -> None:
    """τ must be a non-negative int below H/P (at most one fragment in flight)."""
    if type(overlap) is not int or overlap < 0:
        raise InvalidUsage("overlap must be a non-negative int")
    if overlap >= sync_every // fragments:
        raise InvalidUsage(f"overlap={overlap} must be < sync_every/fragments = {sync_every // fragments}")


def merge_(local: Sequence[torch.Tensor], outer: Sequence[torch.Tensor], alpha: float) -> None:
    """φ ← α·φ + (1−α)·θᵍ in place (two products, then one sum); α = 0 copies θᵍ exactly."""
    for phi, theta in zip(local, outer, strict=True):
        if alpha == 0:
            phi.copy_(theta)
            continue
        a = torch.mul(phi, alpha)
        b = torch.mul(theta.to(phi.device, phi.dtype), 1.0 - alpha)
        phi.copy_(a.add_(b))


class StreamingDiLoCo(_OuterBase):
    """Streaming DiLoCo: staggered fragments, τ steps of overlap, α-merge, per-fragment momentum.

    ``StreamingDiLoCo(model, inner_optimizer, comm, sync_every=H, fragments=P, overlap=tau,
    alpha=0.5, outer_lr=0.7, outer_momentum=0.9, quantization=Quantization.FP4)``; P must divide
    H and τ < H/P. The constructor syncs the shared state (every peer, or a joiner with the
    group's next fragment event, constructs it at the same point). Raises like :class:`DiLoCo`.
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer: Any, comm: Any, sync_every: int = 100,
                 fragments: int = 2, overlap: int = 1, alpha: float = 0.5, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, quantization: Quantization = Quantization.FP4, *,
                 nesterov: bool = True, retry: rs.RetryPolicy | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, outer_dtype: torch.dtype | None = None) -> None:
        if type(fragments) is not int or fragments < 1:
            raise InvalidUsage("fragments must be an int >= 1")
        super().__init__(model, inner_optimizer, comm, sync_every, outer_lr, outer_momentum, nesterov, quantization,
                         retry, bucket_bytes, outer_dtype, fragments)
        if not 0 <= alpha <= 1:
            raise InvalidUsage("alpha must be in [0, 1]")
        self.offsets = offsets(sync_every, fragments)
        check_overlap(sync_every, fragments, overlap)
        self.fragments = partition([t.numel() for t in self.theta], fragments, self.names)
        self.overlap, self.alpha = overlap, float(alpha)
        shapes = [t.shape for t in self.theta]
        self._work = [FlatBuffer([shapes[i] for i in f], self.dtype, bucket_bytes) for f in self.fragments]
        self._src = ([FlatBuffer([shapes[i] for i in f], self.dtype, bucket_bytes) for f in self.fragments]
                     if overlap else None)
        self._t = 0
        self._inflight: tuple[int, int, rs.Background] | None = None  # (fragment, due step, reduce)
        self.last_sync, _ = self._sync()
        self._t = int(self.counters[1])
        self._load_model()

    @property
    def global_step(self) -> int:
        return self._t

    def fragment_names(self) -> list[list[str]]:
        return [[self.names[i] for i in f] for f in self.fragments]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One inner step, then the fragment events of this global step. Returns the closure's loss."""
        loss = self._inner_step(closure)
        self._t += 1
        if self._inflight is not None and self._inflight[1] == self._t:
            p, _, bg = self._inflight
            self._inflight = None
            self._complete(p, bg.wait())
        for p in events_at(self._t, self.sync_every, self.offsets):
            self._start(p)
        return loss

    def _start(self, p: int) -> None:
        idx, work = self.fragments[p], self._work[p]
        if self.overlap == 0:
            res = rs.reduce_avg(self.comm, work.buckets, lambda: self._delta_into(work.views, idx), self.quantization,
                                self.retry, f"fragment {p} all-reduce")
            self._complete(p, res)
            return
        assert self._src is not None
        src = self._src[p]
        self._delta_into(src.views, idx)
        bg = rs.Background(self.comm, work.buckets, lambda: work.flat.copy_(src.flat), self.quantization, self.retry,
                           f"fragment {p} all-reduce")
        self._inflight = (p, self._t + self.overlap, bg)

    def _complete(self, p: int, res: rs.ReduceResult) -> None:
        idx = self.fragments[p]
        steps = self.counters[4 + p]
        outer_sgd_([self.theta[i] for i in idx], [self.momentum[i] for i in idx], self._work[p].views,
                   self.outer_lr, self.outer_momentum, self.nesterov, first=int(steps) == 0)
        steps += 1
        self.counters[0] += 1
        self.counters[1] = self._t
        with torch.no_grad():
            merge_([self.params[i] for i in idx], [self.theta[i] for i in idx], self.alpha)
        info, _ = self._sync()
        if info.rx_bytes:  # a repaired drift (veterans receive nothing in step): restart from θᵍ
            self._load_model()
        self.last_sync = info
        self.last_outer_step = self._stats(res, p, info)

    def finish(self) -> None:
        """Wait and apply a fragment still in flight (call on every peer before evaluating θᵍ)."""
        if self._inflight is not None:
            p, _, bg = self._inflight
            self._inflight = None
            self._complete(p, bg.wait())

    def state_dict(self) -> dict[str, Any]:
        """θᵍ, b, counters, revision, inner optimizer state; a fragment in flight is completed first."""
        self.finish()
        return self._base_state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.finish()
        self._base_load(sd)
        self._t = int(self.counters[1])

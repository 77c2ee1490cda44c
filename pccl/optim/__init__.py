"""Torch optimizers that wrap pccl's fault-tolerant loop (torch is imported here, never by ``pccl``).

* :class:`DiLoCo` — DiLoCo, or one-step-delayed async DiLoCo with ``delayed=True`` (ALGORITHMS §1, §3).
* :class:`StreamingDiLoCo` — fragments, overlap and α-merge (ALGORITHMS §2).
* :class:`SharedSeedSPSA` — shared-seed zeroth-order training, one byte per sample (ALGORITHMS §4).

Each keeps θᵍ, the outer momentum and counters in a :class:`pccl.SharedState`, so a peer that
joins receives them at the next outer step; the user's loop stays
``loss.backward(); opt.step(); opt.zero_grad()``.
"""
from __future__ import annotations

from pccl.optim._resilient import RetryPolicy
from pccl.optim.diloco import DiLoCo, OuterStepStats, outer_sgd_
from pccl.optim.streaming import StreamingDiLoCo

from pccl.optim.spsa import SharedSeedSPSA

__all__ = ["DiLoCo", "OuterStepStats", "RetryPolicy", "SharedSeedSPSA", "StreamingDiLoCo", "outer_sgd_"]

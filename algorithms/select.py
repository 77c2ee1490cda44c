"""AUTO's choice among ring, star and hierarchical all-reduce (pure): the α-β-γ model of
ALGORITHMS.md §6 with the figures of :class:`pccl.Config`.

How it works
1. S = message bytes, N = participants, G = number of distinct locality labels, c = size of the
   smallest locality group. α = seconds per message hop, β = 1 / link bandwidth (inside a
   locality), β_w = 1 / bandwidth between localities, γ = 1 / reduction speed.
2. Ring: 2(N−1) lock-step hops of S/N bytes; when there are several localities, two of the ring's
   links cross between them (when G > 1), so each hop costs the slower link:
   T = 2(N−1)(α + S/N·β_ring) + (N−1)/N·S·γ.
3. Star: the root receives and sends (N−1)·S over its link(s): T = 2α + 2(N−1)S·β_star + (N−1)S·γ
   (β_star is β_w when some member is in another locality than the root).
4. Hierarchical (only when 1 < G < N): inside each group a direct reduce to the c shard owners
   (phase A) and a broadcast back (phase C), each ≈ α + (n−1)/c·S·β on the busiest member (n
   the largest group), and between groups (phase B) c column rings, one per shard, that all
   leave a locality through its one link: that link carries 2(G−1)/G·S, so
   T_B = 2(G−1)·M·α + 2(G−1)/G·S·β_w + (G−1)/G·S/c·γ, with M rings per column taking turns,
   one per segment (``segments``: ``groups.segment_count``, what the plan will use). Phase A
   also reduces: T_A = T_C + (n−1)/c·S·γ. The phases overlap segment by segment, so
   T = max(T_A, T_B, T_C) + (T_A + T_C)/M: the slowest phase plus filling and draining the
   pipeline.
5. β and β_w come from measurements when there are some: after ``optimize_topology`` the
   master takes, per group, the slowest measured directed pair inside a locality (β) and the
   slowest between two localities (β_w) (:func:`measured_rates`), and the topology carries the
   two figures to every peer. The configured figures stand in for a kind nobody measured
   (:func:`link_rates`). The model assumes a locality's members share one link out, which holds
   for the default label (the host name).
6. The cheapest wins; ties go to the ring, then star. Every peer computes this from the same
   inputs (its config and the topology); the resolved algorithm travels in the announcement, so
   peers whose configs disagree fail the op with InvalidUsage instead of running different
   algorithms.
"""
from __future__ import annotations

import math

from pccl.enums import Algorithm


def costs(nbytes: int, localities: list[str], alpha: float, link_bps: float, wan_bps: float,
          reduce_bps: float, segments: int = 1, one_host: bool = False) -> dict[Algorithm, float]:
    """Modelled seconds of each algorithm that applies (``one_host``: item 6 of the module doc)."""
    n = len(localities)
    s = float(nbytes)
    beta, beta_w, gamma = 1.0 / link_bps, 1.0 / wan_bps, 1.0 / reduce_bps
    sizes: dict[str, int] = {}
    for loc in localities:
        sizes[loc] = sizes.get(loc, 0) + 1
    g = len(sizes)
    b_cross = beta_w if g > 1 else beta  # the ring and the star both cross localities when there are several
    # bytes through the busiest link: a ring hop carries S/N, the star's root link (N-1)·S each way;
    # on one host both load the same shared machine with 2(N-1)·S in all
    shared = one_host and g == 1
    ring_wire = 2 * (n - 1) * s * b_cross if shared else 2 * (n - 1) * s / n * b_cross
    star_wire = 2 * (n - 1) * s * b_cross
    out = {
        Algorithm.RING: 2 * (n - 1) * alpha + ring_wire + (n - 1) / n * s * gamma,
        Algorithm.STAR: 2 * alpha + star_wire + (n - 1) * s * gamma,
    }
    if 1 < g < n:
        c, big = min(sizes.values()), max(sizes.values())
        segs = max(1, segments)
        t_c = alpha + (big - 1) / c * s * beta
        t_a = t_c + (big - 1) / c * s * gamma
        t_b = 2 * (g - 1) * (segs * alpha + s / g * beta_w) + (g - 1) / g * s / c * gamma
        out[Algorithm.HIERARCHICAL] = max(t_a, t_b, t_c) + (t_a + t_c) / segs
    return out


def measured_rates(ring: list[int], localities: list[str], rates: dict[tuple[int, int], float]) -> tuple[float, float]:
    """(inside, between) localities in bytes/s for participants ``ring`` (peer ids; their labels
    in ``localities``): the slowest measured directed pair of each kind, 0.0 where no pair of
    that kind was measured. Only finite positive measurements count. The master computes this
    per group and sends it with the topology (``GroupRates``), so every peer uses the same figures."""
    where = dict(zip(ring, localities))
    inside: list[float] = []
    between: list[float] = []
    for (a, b), bps in rates.items():
        if a in where and b in where and a != b and bps > 0 and math.isfinite(bps):
            (inside if where[a] == where[b] else between).append(bps)
    return min(inside, default=0.0), min(between, default=0.0)


def link_rates(measured: tuple[float, float] | None, link_bps: float, wan_bps: float) -> tuple[float, float]:
    """(inside, between) figures for the model: the measured ones (:func:`measured_rates`, as
    the topology carried them), the configured ones where nothing usable was measured."""
    inside, between = measured or (0.0, 0.0)
    ok = [r > 0 and math.isfinite(r) for r in (inside, between)]
    return inside if ok[0] else link_bps, between if ok[1] else wan_bps


def choose(requested: Algorithm, nbytes: int, localities: list[str], alpha: float, link_bps: float,
           wan_bps: float, reduce_bps: float, segments: int = 1, one_host: bool = False) -> Algorithm:
    """``requested`` unless it is AUTO; then the modelled fastest."""
    if requested is not Algorithm.AUTO:
        return requested
    if len(localities) <= 1:
        return Algorithm.RING
    c = costs(nbytes, localities, alpha, link_bps, wan_bps, reduce_bps, segments, one_host)
    order = [Algorithm.RING, Algorithm.STAR, Algorithm.HIERARCHICAL]
    return min((a for a in order if a in c), key=lambda a: (c[a], order.index(a)))

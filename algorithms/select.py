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
4. Hierarchical (only when 1 < G < N): inside each group a direct reduce to the c shard owners and
   a broadcast back (each ≈ α + (n−1)/c·S·β on the busiest member, n the largest group), plus a
   ring over G groups of S/c bytes on the slow links: 2(G−1)(α + S/(cG)·β_w).
5. The cheapest wins; ties go to the ring, then star. Every peer computes this from the same
   inputs (its config and the topology); the resolved algorithm travels in the announcement, so
   peers whose configs disagree fail the op with InvalidUsage instead of running different
   algorithms.
"""
from __future__ import annotations

from pccl.enums import Algorithm


def costs(nbytes: int, localities: list[str], alpha: float, link_bps: float, wan_bps: float,
          reduce_bps: float) -> dict[Algorithm, float]:
    """Modelled seconds of each algorithm that applies."""
    n = len(localities)
    s = float(nbytes)
    beta, beta_w, gamma = 1.0 / link_bps, 1.0 / wan_bps, 1.0 / reduce_bps
    sizes: dict[str, int] = {}
    for loc in localities:
        sizes[loc] = sizes.get(loc, 0) + 1
    g = len(sizes)
    b_cross = beta_w if g > 1 else beta  # the ring and the star both cross localities when there are several
    out = {
        Algorithm.RING: 2 * (n - 1) * (alpha + s / n * b_cross) + (n - 1) / n * s * gamma,
        Algorithm.STAR: 2 * alpha + 2 * (n - 1) * s * b_cross + (n - 1) * s * gamma,
    }
    if 1 < g < n:
        c, big = min(sizes.values()), max(sizes.values())
        intra = 2 * (alpha + (big - 1) / c * s * beta) + (big - 1) / c * s * gamma
        out[Algorithm.HIERARCHICAL] = intra + 2 * (g - 1) * (alpha + s / (c * g) * beta_w) + (g - 1) / g * s / c * gamma
    return out


def choose(requested: Algorithm, nbytes: int, localities: list[str], alpha: float, link_bps: float,
           wan_bps: float, reduce_bps: float) -> Algorithm:
    """``requested`` unless it is AUTO; then the modelled fastest."""
    if requested is not Algorithm.AUTO:
        return requested
    if len(localities) <= 1:
        return Algorithm.RING
    c = costs(nbytes, localities, alpha, link_bps, wan_bps, reduce_bps)
    order = [Algorithm.RING, Algorithm.STAR, Algorithm.HIERARCHICAL]
    return min((a for a in order if a in c), key=lambda a: (c[a], order.index(a)))

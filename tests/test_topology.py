"""Ring-order solver and measurement schedule (pure; ALGORITHMS.md §6.1, check C1 in §7).

References are written independently of the module: brute force over every tour from node 0
(numpy, all (N-1)! permutations at once) and a Held-Karp DP over subsets for N = 12.
"""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pccl.algorithms.topology import (
    UNMEASURED_BW,
    measurement_rounds,
    ring_time,
    solve_ring,
    tour_cost,
)

from pccl.errors import InvalidUsage

GBIT = 125e6  # bytes/s


# --------------------------------------------------------------------------- references
def clean(bw) -> np.ndarray:
    """The module's documented reading of a matrix: unusable entries become UNMEASURED_BW."""
    w = np.array(bw, dtype=np.float64)
    w[~(w > 0)] = UNMEASURED_BW
    return w


def brute_force(bw) -> tuple[float, float]:
    """(best bottleneck, least sum of 1/bw among tours with that bottleneck) over all tours."""
    w = clean(bw)
    n = len(w)
    if n == 1:
        return math.inf, 0.0
    rest = np.array(list(itertools.permutations(range(1, n))), dtype=np.intp)
    tours = np.hstack([np.zeros((len(rest), 1), dtype=np.intp), rest])
    e = w[tours, np.roll(tours, -1, axis=1)]
    bott = e.min(axis=1)
    b = bott.max()
    return float(b), float((1.0 / e[bott == b]).sum(axis=1).min())


def held_karp(bw, threshold: float, strict: bool = False) -> float:
    """Least sum of 1/bw over tours using only edges >= threshold (> if strict); inf if none."""
    w = clean(bw)
    n = len(w)
    ok = w > threshold if strict else w >= threshold
    c = np.where(ok, 1.0 / w, np.inf)
    m, full = n - 1, 1 << (n - 1)  # subsets of nodes 1..n-1
    d = np.full((full, m), np.inf)  # d[S, v]: cheapest path 0 -> ... -> v+1 visiting exactly S
    for v in range(m):
        d[1 << v, v] = c[0, v + 1]
    masks = np.arange(full)
    pop = np.array([x.bit_count() for x in range(full)])
    for k in range(2, m + 1):
        layer = masks[pop == k]
        for v in range(m):
            sel = layer[(layer >> v) & 1 == 1]
            d[sel, v] = (d[sel ^ (1 << v)] + c[1:, v + 1]).min(axis=1)
    return float((d[full - 1] + c[1:, 0]).min())


def assert_tour(tour: list[int], n: int) -> None:
    assert sorted(tour) == list(range(n))
    assert n == 0 or tour[0] == 0


def random_matrix(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "lognormal":  # heterogeneous WAN links, every value distinct
        return rng.lognormal(0.0, 1.0, (n, n)) * GBIT
    if kind == "levels":  # NIC classes: many equal bandwidths, so the sum tie-break matters
        return rng.choice([1, 10, 10, 25, 25, 25], (n, n)) * GBIT * rng.uniform(0.9, 1.0, (n, n)).round(1)
    # two or three sites: fast inside a site, slow across, ~10 % spread per link
    site = rng.integers(0, 3, n)
    base = np.where(site[:, None] == site[None, :], 10 * GBIT, 0.5 * GBIT)
    return base * rng.uniform(0.9, 1.1, (n, n))


# --------------------------------------------------------------------------- exact range
bandwidths = st.one_of(st.just(0.0), st.sampled_from([GBIT, 2 * GBIT, 10 * GBIT]),
                       st.floats(1e3, 1e11, allow_nan=False))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.lists(st.lists(bandwidths, min_size=n, max_size=n),
                                                    min_size=n, max_size=n)))
def test_exact_matches_brute_force(bw: list[list[float]]) -> None:
    tour = solve_ring(bw)
    assert_tour(tour, len(bw))
    b, s = tour_cost(bw, tour)
    best_b, best_s = brute_force(bw)
    assert b == best_b
    assert s == pytest.approx(best_s, rel=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_n9_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bw = random_matrix(rng, 9, ["lognormal", "levels", "sites"][seed])
    tour = solve_ring(bw)
    assert_tour(tour, 9)
    b, s = tour_cost(bw, tour)
    best_b, best_s = brute_force(bw)
    assert b == best_b and s == pytest.approx(best_s, rel=1e-8)


def test_ties_go_to_the_lexicographically_smallest_tour() -> None:
    assert solve_ring(np.full((6, 6), GBIT)) == [0, 1, 2, 3, 4, 5]
    assert solve_ring([[0.0] * 5] * 5) == [0, 1, 2, 3, 4]  # all unmeasured: still a tour
    # Symmetric ring 0-1-2-3-0 at 10 Gbit/s, chords at 1: both directions are optimal, take 0,1,2,3.
    bw = np.full((4, 4), GBIT)
    for i in range(4):
        bw[i, (i + 1) % 4] = bw[(i + 1) % 4, i] = 10 * GBIT
    assert solve_ring(bw) == [0, 1, 2, 3]


def test_one_slow_link_is_avoided() -> None:
    for n in (4, 7, 12, 20):
        bw = np.full((n, n), 10 * GBIT)
        bw[0, 1] = 1e3
        tour = solve_ring(bw)
        assert_tour(tour, n)
        assert tour[1] != 1  # never 0 -> 1
        assert tour_cost(bw, tour)[0] == 10 * GBIT


def test_small_and_degenerate_inputs() -> None:
    assert solve_ring([]) == []
    assert solve_ring([[0.0]]) == [0]
    assert solve_ring([[0.0, 5.0], [7.0, 0.0]]) == [0, 1]
    # None, NaN, negative, missing entries and a ragged row are unmeasured links, not errors.
    bw = [[None, 1e9, float("nan"), -1.0], [1e9, 0, 2e9], [1e9, 1e9, 0, 3e9], [4e9, None, 1e9]]
    tour = solve_ring(bw)
    assert_tour(tour, 4)
    assert tour_cost(bw, tour)[0] == 1e9
    for n in (10, 20):  # heuristic paths with mostly unmeasured links
        w = np.zeros((n, n))
        w[0, 3] = w[3, 0] = GBIT
        assert_tour(solve_ring(w), n)


def test_tour_cost_and_ring_time() -> None:
    bw = [[0, 4.0, 1.0], [2.0, 0, 8.0], [1.0, 5.0, 0]]
    assert tour_cost(bw, [0, 1, 2]) == (1.0, 1 / 4 + 1 / 8 + 1.0)
    assert tour_cost([[0.0]], [0]) == (math.inf, 0.0)
    # 2(N-1) lock-step stages, each as slow as the slowest link: 4 * max(1 + 6/3/4, 0 + 2/8, 2 + 2/1)
    alpha = [[0, 1.0, 0], [0, 0, 0], [2.0, 0, 0]]
    assert ring_time(bw, [0, 1, 2], 6.0, alpha) == 4 * max(1 + 2 / 4, 2 / 8, 2 + 2 / 1)
    assert ring_time(bw, [0, 1, 2], 6.0) == 4 * (2 / 1)
    assert ring_time([[0.0]], [0], 1e9) == 0.0
    with pytest.raises(InvalidUsage):
        tour_cost(bw, [0, 1, 1])
    with pytest.raises(InvalidUsage):
        solve_ring([1.0, 2.0])


def test_deterministic() -> None:
    rng = np.random.default_rng(7)
    for n, kind in [(8, "levels"), (12, "levels"), (12, "sites"), (24, "lognormal")]:
        bw = random_matrix(rng, n, kind)
        first = solve_ring(bw, iterations=50, time_limit=60.0)
        assert_tour(first, n)
        assert solve_ring(bw.tolist(), iterations=50, time_limit=60.0) == first  # again, from lists


def test_planted_ring_is_found_beyond_the_dp_range() -> None:
    # N = 40: bottleneck by binary search + budgeted cycle probes. Only the planted cycle uses
    # links >= 10 Gbit/s, so it is the unique best ring.
    rng = np.random.default_rng(3)
    n = 40
    bw = rng.uniform(0.1, 1.0, (n, n)) * GBIT
    cycle = [0, *rng.permutation(np.arange(1, n)).tolist()]
    for i, j in zip(cycle, cycle[1:] + cycle[:1]):
        bw[i, j] = rng.uniform(10, 11) * GBIT
    assert solve_ring(bw, iterations=20, time_limit=60.0) == cycle


# --------------------------------------------------------------------------- C1: heuristic, N = 12
@pytest.mark.parametrize("seed", range(9))
def test_c1_heuristic_n12(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    bw = random_matrix(rng, 12, ["lognormal", "levels", "sites"][seed % 3])
    tour = solve_ring(bw, seed=seed, time_limit=60.0)
    assert_tour(tour, 12)
    b, s = tour_cost(bw, tour)
    assert held_karp(bw, b, strict=True) == math.inf  # no tour has a wider bottleneck
    assert s <= 1.05 * held_karp(bw, b)  # sum cost within 5 % of the optimum at that bottleneck
    # Simulated ring all-reduce time vs the best of 10^4 random tours.
    nbytes = 1 << 30
    w = clean(bw)
    perms = np.argsort(rng.random((10_000, 11)), axis=1) + 1
    tours = np.hstack([np.zeros((10_000, 1), dtype=np.intp), perms])
    slowest = w[tours, np.roll(tours, -1, axis=1)].min(axis=1)
    best_random = float((2 * 11 * (nbytes / 12) / slowest).min())
    k = int(np.argmax(slowest))  # the fastest random ring
    assert ring_time(bw, tours[k].tolist(), nbytes) == pytest.approx(best_random, rel=1e-12)
    assert ring_time(bw, tour, nbytes) <= 1.05 * best_random


# --------------------------------------------------------------------------- measurement schedule
def check_rounds(n: int, measured: set[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    rounds = measurement_rounds(n, measured)
    flat = [p for r in rounds for p in r]
    missing = {(i, j) for i in range(n) for j in range(n) if i != j} - measured
    assert len(flat) == len(set(flat)) and set(flat) == missing  # every missing pair exactly once
    for r in rounds:
        nodes = [x for p in r for x in p]
        assert r and len(nodes) == len(set(nodes))  # no empty round, no node twice in a round
    return rounds


@pytest.mark.parametrize("n", range(17))
def test_full_schedule_is_optimal(n: int) -> None:
    rounds = check_rounds(n, set())
    # A round measures at most floor(n/2) links, so n(n-1) links need >= 2(n-1) rounds (2n if odd).
    assert len(rounds) == (0 if n < 2 else 2 * (n - 1) if n % 2 == 0 else 2 * n)
    assert measurement_rounds(n, set()) == rounds  # deterministic


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 12), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_partial_schedule(n: int, seed: int, frac: float) -> None:
    r = random.Random(seed)
    measured = {(i, j) for i in range(n) for j in range(n) if i != j and r.random() < frac}
    rounds = check_rounds(n, measured | {(0, 0), (n, n + 1)})  # junk pairs are ignored
    assert len(rounds) <= 2 * n


def test_new_peer_and_all_measured() -> None:
    n = 6
    known = {(i, j) for i in range(n - 1) for j in range(n - 1) if i != j}
    rounds = check_rounds(n, known)  # peer 5 joined: its 10 links share a node, one per round
    assert len(rounds) == 2 * (n - 1)
    everything = {(i, j) for i in range(n) for j in range(n) if i != j}
    assert measurement_rounds(n, everything) == []

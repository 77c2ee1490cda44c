"""Ring order from measured link bandwidths, and the schedule for measuring them (ALGORITHMS.md §6.1).

How it works
1. Ring stages run in lock-step, so a ring is as fast as its slowest link: maximise the smallest
   bandwidth on the tour (the bottleneck) first, then minimise the sum of per-byte costs 1/bw,
   then take the lexicographically smallest tour from node 0. Sums within a relative 1e-9 are
   ties, so float rounding never decides. Unmeasured links (0, None, NaN, negative, missing)
   get a tiny bandwidth: used only when no tour avoids them.
2. Bottleneck t. N <= 16: exact subset DP, B[S, v] = widest path 0 -> ... -> v through exactly
   S (Held-Karp with (max, min) for (min, +)), one subset size at a time in numpy. N > 16: the
   widest-next-edge tour gives a feasible t, raised by binary search over the edge values; each
   probe is a pruned depth-first Hamiltonian-cycle search with a fixed step budget.
3. Sum over edges >= t. N <= exact_limit: depth-first enumeration of tours from 0 in lexicographic
   order, pruned by partial sum + the cheapest exit of every node still to leave. Larger N:
   iterated local search. Or-opt moves a segment of 1-3 nodes elsewhere keeping its direction
   (a reversal changes costs on an asymmetric matrix); it starts from the DP/search tour and a
   nearest-neighbour tour from every node; then ``iterations`` seeded kicks of the current tour
   (segments A B C D -> A C B D or A D C B, both direction-preserving), each followed by Or-opt.
4. Determinism: randomness only from ``random.Random(seed)``, work budgets are counts.
   ``time_limit`` is a safety cap for huge inputs; keep it generous where output must repeat.
5. Measurement: the circle-method round robin meets every two nodes once in n-1 rounds (n even;
   n with a bye for odd n); a pass for a->b, then one for b->a: 2(n-1) rounds (2n for odd n),
   optimal since a round holds at most floor(n/2) links. Both directions of a pair never share a
   round: each timed send would compete with its reverse for the same two hosts. Missing pairs
   go first-fit in that order, which for a full schedule is the round robin itself.
"""
from __future__ import annotations

import math
import random
import time
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TypeAlias

import numpy as np

from pccl.errors import InvalidUsage

Matrix: TypeAlias = "np.ndarray | Sequence[Sequence[float | None]]"

#: Bandwidth (bytes/s) assumed for an unmeasured or unusable link: below any real link.
UNMEASURED_BW = 1e-6
_DP_LIMIT = 16  # the bottleneck DP holds 2^(N-1) x (N-1) floats: 3.8 MiB at N = 16
_REL = 1e-9  # sums closer than this (relative) are ties
_SEG = 3  # Or-opt segment lengths 1.._SEG
_SEARCH_STEPS = 100  # per node, for each Hamiltonian-cycle probe when N > 16


def _bandwidth(bw: Matrix) -> np.ndarray:
    """N x N float64 copy of ``bw`` (N = number of rows); unusable entries set to UNMEASURED_BW."""
    try:
        n = len(bw)
        try:
            a = np.array(bw, dtype=np.float64)  # None -> NaN here
        except ValueError:  # ragged rows
            a = np.empty(0)
        if a.shape != (n, n):  # entries missing from short rows stay NaN
            a = np.full((n, n), np.nan)
            for i, row in enumerate(bw):
                a[i, :min(n, len(row))] = [np.nan if v is None else float(v) for v in list(row)[:n]]
    except (TypeError, ValueError) as exc:
        raise InvalidUsage(f"bandwidths must be an N x N matrix of numbers: {exc}") from exc
    a[~(a > 0)] = UNMEASURED_BW  # NaN > 0 is False, so NaN is caught too
    return a


def _edges(tour: Sequence[int]) -> list[tuple[int, int]]:
    n = len(tour)
    return [(tour[k], tour[(k + 1) % n]) for k in range(n)] if n > 1 else []


def _check(tour: Sequence[int], n: int) -> None:
    if sorted(tour) != list(range(n)):
        raise InvalidUsage(f"tour {list(tour)} is not a permutation of 0..{n - 1}")


def tour_cost(bw: Matrix, tour: Sequence[int]) -> tuple[float, float]:
    """(bottleneck bandwidth, sum of 1/bw) of ``tour``; (inf, 0.0) for one node.

    The sum is added in tour order from ``tour[0]``, the order the solver uses. Raises
    InvalidUsage if ``bw`` is not a matrix or ``tour`` not a permutation of its nodes.
    """
    w = _bandwidth(bw)
    _check(tour, len(w))
    bottleneck = min((float(w[i, j]) for i, j in _edges(tour)), default=math.inf)
    return bottleneck, _tour_sum((1.0 / w).tolist(), tour)


def ring_time(bw: Matrix, tour: Sequence[int], nbytes: float, alpha: Matrix | None = None) -> float:
    """Lock-step ring all-reduce time: 2(N-1) * max over tour edges of (alpha_ij + nbytes/N/bw_ij).

    ``alpha`` is an optional N x N latency matrix in seconds (default 0). Raises InvalidUsage if
    ``bw`` is not a matrix or ``tour`` not a permutation of its nodes.
    """
    w = _bandwidth(bw)
    n = len(w)
    _check(tour, n)
    if n < 2:
        return 0.0
    a = np.zeros((n, n)) if alpha is None else np.asarray(alpha, dtype=np.float64)
    return 2 * (n - 1) * max(float(a[i, j]) + nbytes / n / float(w[i, j]) for i, j in _edges(tour))


def solve_ring(bw: Matrix, *, exact_limit: int = 9, seed: int = 0, time_limit: float | None = 1.0,
               iterations: int = 200) -> list[int]:
    """Ring order starting at node 0: widest bottleneck, then least sum of 1/bw, then lexicographic.

    Exact for N <= min(exact_limit, 16); otherwise the bottleneck is exact up to N = 16 and the
    sum comes from ``iterations`` seeded local-search rounds (see the module docstring).
    ``time_limit`` (seconds, None = none) only caps runaway inputs: N = 12 takes ~0.15 s and
    N = 16 ~0.4 s of CPU, but from N ~ 30 the local search can reach the default 1 s cap, and then
    the result depends on CPU speed.
    Raises InvalidUsage if ``bw`` is not a matrix.
    """
    w = _bandwidth(bw)
    n = len(w)
    if n <= 2:
        return list(range(n))
    deadline = math.inf if time_limit is None else time.monotonic() + time_limit
    t, start = _bottleneck_dp(w) if n <= _DP_LIMIT else _bottleneck_search(w, deadline)
    cost = [[1.0 / x if x >= t and i != j else math.inf for j, x in enumerate(row)]
            for i, row in enumerate(w.tolist())]
    if n <= min(exact_limit, _DP_LIMIT):
        return _exact_sum(cost)
    return _heuristic_sum(cost, start, random.Random(seed), iterations, deadline)


# --------------------------------------------------------------------------- bottleneck
def _bottleneck_dp(w: np.ndarray) -> tuple[float, list[int]]:
    """Exact best bottleneck and one tour achieving it (3 <= N <= 16)."""
    n = len(w)
    m, full = n - 1, 1 << (n - 1)  # subsets of nodes 1..n-1; bit v is node v + 1
    inner = w[1:, 1:]
    b = np.full((full, m), -np.inf)  # -inf: v not in S, so it never wins a max
    for v in range(m):
        b[1 << v, v] = w[0, v + 1]
    masks = np.arange(full)
    pop = np.array([x.bit_count() for x in range(full)])
    for k in range(2, m + 1):
        layer = masks[pop == k]
        for v in range(m):
            sel = layer[(layer >> v) & 1 == 1]
            b[sel, v] = np.minimum(b[sel ^ (1 << v)], inner[:, v]).max(axis=1)
    closing = np.minimum(b[full - 1], w[1:, 0])
    t = float(closing.max())
    # Walk back: at each step some predecessor keeps every edge >= t (that is what B >= t says).
    v, mask, back = int(np.argmax(closing >= t)), full - 1, []
    while True:
        back.append(v + 1)
        mask ^= 1 << v
        if not mask:
            break
        v = int(np.argmax((b[mask] >= t) & (inner[:, v] >= t)))
    return t, [0, *reversed(back)]


def _bottleneck_search(w: np.ndarray, deadline: float) -> tuple[float, list[int]]:
    """Best bottleneck found by binary search with budgeted cycle probes (N > 16)."""
    n = len(w)
    off = w.copy()
    np.fill_diagonal(off, -np.inf)
    tour = _nearest((-off).tolist(), 0)  # widest next edge; the matrix is complete, so it closes
    best_t, best = min(float(w[i, j]) for i, j in _edges(tour)), tour
    # No tour beats the weakest "widest exit" or "widest entry" of any node.
    cap = min(off.max(axis=1).min(), off.max(axis=0).min())
    vals = sorted({float(x) for x in off[off > best_t] if x <= cap})
    order = [sorted(range(n), key=lambda u: (-off[v, u], u))[:-1] for v in range(n)]
    lo, hi = 0, len(vals) - 1
    while lo <= hi and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        found = _find_cycle([[u for u in order[v] if off[v, u] >= vals[mid]] for v in range(n)],
                            _SEARCH_STEPS * n)
        if found is None:
            hi = mid - 1
        else:
            best = found
            best_t = min(float(w[i, j]) for i, j in _edges(found))
            lo = bisect_right(vals, best_t)
    return best_t, best


def _find_cycle(succ: list[list[int]], budget: int) -> list[int] | None:
    """Depth-first Hamiltonian cycle from 0 over ``succ``; None if none found within ``budget`` steps.

    Prunes a branch as soon as a node still to be entered has no possible predecessor left
    (unvisited or the path's end) or a node still to be left has no possible successor
    (unvisited or 0). Tries successors with the fewest onward options first (Warnsdorff).
    """
    n = len(succ)
    pred: list[list[int]] = [[] for _ in range(n)]
    for v, us in enumerate(succ):
        for u in us:
            pred[u].append(v)
    ins, outs = [len(p) for p in pred], [len(s) for s in succ]
    seen = [True] + [False] * (n - 1)
    path: list[int] = [0]
    frames = [iter(succ[0])]
    for _ in range(budget):
        if not frames:
            return None
        u = next(frames[-1], None)
        if u is not None and seen[u]:
            continue
        if u is None:  # exhausted: undo the step that entered path[-1]
            frames.pop()
            u = path.pop()
            if not path:
                return None
            seen[u] = False
            for x in succ[path[-1]]:
                ins[x] += 1
            for x in pred[u]:
                outs[x] += 1
            continue
        v = path[-1]
        path.append(u)
        seen[u] = True
        for x in succ[v]:  # v stops being anyone's possible predecessor
            ins[x] -= 1
        for x in pred[u]:  # u stops being anyone's possible successor
            outs[x] -= 1
        if len(path) == n and 0 in succ[u]:
            return path
        dead = len(path) == n or any(ins[x] == 0 and (x == 0 or not seen[x]) for x in succ[v]) \
            or any(outs[x] == 0 and not seen[x] for x in pred[u])
        frames.append(iter([]) if dead else iter(sorted(
            (x for x in succ[u] if not seen[x]), key=lambda x: outs[x])))
    return None


# --------------------------------------------------------------------------- sum of 1/bw
def _tour_sum(cost: list[list[float]], tour: Sequence[int]) -> float:
    total = 0.0  # same order as tour_cost, so equal tours give equal floats
    for i, j in _edges(tour):
        total += cost[i][j]
    return total


def _better(s: float, tour: list[int], best_s: float, best: list[int]) -> bool:
    return s < best_s * (1 - _REL) or (s <= best_s * (1 + _REL) and tour < best)


def _exact_sum(cost: list[list[float]]) -> list[int]:
    """Least-sum tour over finite-cost edges, lexicographically smallest among ties."""
    n = len(cost)
    succ = [[j for j in range(n) if cost[i][j] < math.inf] for i in range(n)]  # ascending: lex order
    exit_min = [min((cost[i][j] for j in succ[i]), default=math.inf) for i in range(n)]
    best: list[int] = []
    best_s = math.inf
    path, seen = [0], [True] + [False] * (n - 1)

    def dfs(v: int, partial: float, rest: float) -> None:
        nonlocal best, best_s
        if len(path) == n:
            s = partial + cost[v][0]
            if s < best_s * (1 - _REL):  # lex order of the walk makes the first of equals win
                best, best_s = path.copy(), s
            return
        # Every node still to leave (v and the unvisited) pays at least its cheapest exit.
        if partial + exit_min[v] + rest >= best_s * (1 - _REL / 2):
            return
        for u in succ[v]:
            if not seen[u]:
                seen[u] = True
                path.append(u)
                dfs(u, partial + cost[v][u], rest - exit_min[u])
                path.pop()
                seen[u] = False

    dfs(0, 0.0, sum(exit_min[1:]))
    return best


def _rotate(tour: list[int]) -> list[int]:
    k = tour.index(0)
    return tour[k:] + tour[:k]


def _nearest(cost: list[list[float]], start: int) -> list[int]:
    tour, left = [start], set(range(len(cost))) - {start}
    while left:
        u = min(left, key=lambda u: (cost[tour[-1]][u], u))
        tour.append(u)
        left.remove(u)
    return _rotate(tour)


def _or_opt(tour: list[int], cost: list[list[float]], eps: float) -> list[int]:
    """Or-opt to a local optimum: move a segment of 1.._SEG nodes, same direction, elsewhere.

    ``eps`` is the smallest gain worth a move (float noise could otherwise cycle).
    """
    t, n = tour[:], len(tour)
    cols = [list(c) for c in zip(*cost)]  # cols[j][i] = cost[i][j]
    improved = True
    while improved:
        improved = False
        tt = t + t  # positions up to 2n - 1 without "% n"
        for seg in range(1, min(_SEG, n - 2) + 1):
            for i in range(n):  # the segment t[i .. i+seg-1] sits between p and q
                s0, s1, p, q = tt[i], tt[i + seg - 1], tt[i + n - 1], tt[i + seg]
                c0, c1 = cols[s0], cost[s1]
                gain = c0[p] + c1[q] - cost[p][q] - eps  # a move must beat the current cost by eps
                for k in range(i + seg, i + n - 1):  # insert between a and b on the path q ... p
                    a, b = tt[k], tt[k + 1]
                    if c0[a] + c1[b] - cost[a][b] < gain:
                        t = tt[i + seg:k + 1] + tt[i:i + seg] + tt[k + 1:i + n]
                        tt = t + t
                        improved = True
                        break
    return _rotate(t)


def _heuristic_sum(cost: list[list[float]], start: list[int], rng: random.Random,
                   iterations: int, deadline: float) -> list[int]:
    n = len(cost)
    best, best_s = start, _tour_sum(cost, start)
    # At the best bottleneck few edges are allowed, so a search confined to allowed tours is
    # fragmented. Search instead with a penalty per forbidden edge larger than any allowed tour
    # (each allowed edge costs <= 1/t): fewer forbidden edges always wins, and the walk may pass
    # through forbidden tours on its way between allowed ones.
    big = 2 * n * max(c for row in cost for c in row if c < math.inf)
    pen = [[c if c < math.inf else big for c in row] for row in cost]
    eps = _REL * best_s  # ignore float-noise "improvements": they could cycle
    cur, cur_p = best, math.inf
    tours = [start] + [_nearest(pen, s) for s in range(n)]
    for k in range(-len(tours), iterations if n >= 4 else 0):
        if time.monotonic() > deadline:
            break
        if k < 0:
            tour = tours[k]
        else:  # kick: reorder segments A B C D, alternately to A C B D (3 new edges), A D C B (4)
            a, b, c = sorted(rng.sample(range(1, n), 3))
            tour = cur[:a] + (cur[b:c] + cur[a:b] + cur[c:] if k % 2 else cur[c:] + cur[b:c] + cur[a:b])
        tour = _or_opt(tour, pen, eps)
        if (p := _tour_sum(pen, tour)) <= cur_p + eps:  # walk on, sideways moves included
            cur, cur_p = tour, p
        if _better(s := _tour_sum(cost, tour), tour, best_s, best):
            best, best_s = tour, s
    return best


# --------------------------------------------------------------------------- measurement
def _round_robin(n: int) -> list[tuple[int, int]]:
    """All directed pairs, ordered by circle-method round (a->b pass, then the b->a pass)."""
    m = n + (n % 2)  # a bye node m-1 == n when n is odd
    ring = list(range(m))
    forward: list[tuple[int, int]] = []
    for _ in range(m - 1):
        for k in range(m // 2):
            a, b = sorted((ring[k], ring[m - 1 - k]))
            if b < n:
                forward.append((a, b))
        ring = [ring[0], ring[-1], *ring[1:-1]]  # rotate all but the first
    return forward + [(b, a) for a, b in forward]


def measurement_rounds(n: int, measured: Iterable[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Rounds of directed pairs (i, j) not in ``measured``; no node appears twice in a round.

    Every missing pair appears exactly once. A full schedule takes 2(n-1) rounds (2n for odd n).
    """
    done = set(measured)
    rounds: list[list[tuple[int, int]]] = []
    busy: list[set[int]] = []
    for i, j in _round_robin(n):
        if (i, j) in done:
            continue
        r = next((r for r, used in enumerate(busy) if i not in used and j not in used), len(rounds))
        if r == len(rounds):
            rounds.append([])
            busy.append(set())
        rounds[r].append((i, j))
        busy[r].update((i, j))
    return rounds

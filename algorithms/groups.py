"""Star and hierarchical all-reduce schedules (pure): who sends which shard to whom, in which phase.

How it works
1. The participants (in ring order) are cut into *groups* by their locality label, groups in order
   of first appearance, members of a group in ring order. ``columns`` c is the size of the
   smallest group. The buffer is cut into c *shards* (same rule as ring chunks); member j < c of
   every group *owns* shard j.
2. Phase A (reduce inside the group): every member sends each shard it does not own to that
   shard's owner in its group. The owner reduces the shard in fixed member order (member 0 first,
   whatever order the bytes arrive in), piece by piece as the pieces of all members are in.
3. Phase B (across groups, only when there are several groups): the owners of shard j, one per
   group, run a ring all-reduce of shard j (the "2-D" form of ALGORITHMS.md §6: every column
   carries its share across the slow links in parallel). AVG runs the ring as SUM; each owner
   divides by the world size afterwards, which is deterministic, so all owners stay identical.
4. Phase C (broadcast inside the group): each owner sends its final shard to every other member.
   Every element is reduced along exactly one path and then only copied, so all peers end with
   identical bytes (DESIGN.md §4.2).
5. STAR is the special case of one group holding every participant and one shard: everybody
   sends its whole buffer to the root (rank 0), the root reduces in rank order and broadcasts.
Pieces: every shard is cut into the same number of pieces (pipelining, like the ring); piece p of
every transfer travels on connection p mod K of that directed link.
Segments: the pieces of a shard are also cut into up to ``MAX_SEGMENTS`` runs of consecutive
pieces. Phase B runs one ring per segment; a segment's ring starts once phase A has reduced
that segment and the previous segment's ring is done (the rings take turns on the column's
links), and phase C sends a piece as soon as its segment's ring is done. So the three phases
overlap instead of following each other: the slow links start after the first segment, not
after the whole shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pccl.algorithms.ring import split

#: frame ``step`` values of the two intra-group phases (the ring of phase B uses 0..2G-3)
STEP_REDUCE = 0xA000_0000
STEP_BROADCAST = 0xC000_0000
#: most segments a shard is cut into (see the module doc)
MAX_SEGMENTS = 8


def group_ranks(localities: list[str]) -> tuple[tuple[int, ...], ...]:
    """Ranks grouped by locality label: groups in order of first appearance, ranks ascending."""
    order: dict[str, list[int]] = {}
    for rank, loc in enumerate(localities):
        order.setdefault(loc, []).append(rank)
    return tuple(tuple(v) for v in order.values())


@dataclass(frozen=True)
class GroupPlan:
    count: int
    rank: int
    groups: tuple[tuple[int, ...], ...]
    pieces: int  # pieces per shard
    lanes: int
    shards: tuple[tuple[int, int], ...]
    segments: tuple[tuple[int, int], ...]  # piece-index ranges [a, b), consecutive, covering 0..pieces

    @property
    def world(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def group(self) -> int:
        return next(i for i, g in enumerate(self.groups) if self.rank in g)

    @property
    def members(self) -> tuple[int, ...]:
        return self.groups[self.group]

    @property
    def member(self) -> int:
        return self.members.index(self.rank)

    @property
    def columns(self) -> int:
        return len(self.shards)

    @property
    def owned(self) -> int | None:
        """The shard this rank owns, or None (a member beyond the smallest group's size)."""
        return self.member if self.member < self.columns else None

    def owner(self, shard: int) -> int:
        """The rank owning ``shard`` in this rank's group."""
        return self.members[shard]

    def column(self) -> tuple[int, ...]:
        """Ranks of the owners of this rank's shard, one per group, in group order (the ring of
        phase B); empty for non-owners."""
        j = self.owned
        return () if j is None else tuple(g[j] for g in self.groups)

    def piece(self, shard: int, p: int) -> tuple[int, int]:
        lo, hi = self.shards[shard]
        return split(lo, hi, self.pieces)[p]

    def segment_range(self, shard: int, s: int) -> tuple[int, int]:
        """Element range of segment ``s`` of ``shard``."""
        a, b = self.segments[s]
        return self.piece(shard, a)[0], self.piece(shard, b - 1)[1]

    def segment_of(self, p: int) -> int:
        return next(s for s, (a, b) in enumerate(self.segments) if a <= p < b)


def _pieces(shard: int, itemsize: int, pipeline_bytes: int, lanes: int, min_piece_bytes: int) -> int:
    """Pieces per shard when the biggest shard has ``shard`` elements."""
    biggest = shard * itemsize
    pieces = max(1, math.ceil(biggest / max(pipeline_bytes, 1)))
    if biggest >= lanes * min_piece_bytes:
        pieces = max(pieces, lanes)  # let one op use every connection of the link
    return min(pieces, max(1, shard))


def segment_count(count: int, localities: list[str], itemsize: int, pipeline_bytes: int, lanes: int,
                  min_piece_bytes: int = 64 << 10) -> int:
    """The number of segments per shard that :func:`plan` gives a hierarchical all-reduce."""
    columns = min(len(g) for g in group_ranks(localities))
    lo, hi = split(0, count, columns)[0]
    return min(_pieces(hi - lo, itemsize, pipeline_bytes, lanes, min_piece_bytes), MAX_SEGMENTS)


def plan(count: int, localities: list[str], rank: int, itemsize: int, pipeline_bytes: int, lanes: int,
         star: bool = False, min_piece_bytes: int = 64 << 10) -> GroupPlan:
    """The schedule of ``rank`` among ``len(localities)`` participants (ring order). ``star``:
    one group, one shard, root rank 0."""
    n = len(localities)
    if n < 1 or not 0 <= rank < n or lanes < 1 or count < 0:
        raise ValueError("bad group plan parameters")
    groups = (tuple(range(n)),) if star else group_ranks(localities)
    columns = 1 if star else min(len(g) for g in groups)
    shards = tuple(split(0, count, columns))
    pieces = _pieces(shards[0][1] - shards[0][0], itemsize, pipeline_bytes, lanes, min_piece_bytes)
    segments = tuple(split(0, pieces, min(pieces, MAX_SEGMENTS)))
    return GroupPlan(count, rank, groups, pieces, min(lanes, pieces), shards, segments)


def overwrite_order(plan: GroupPlan) -> list[tuple[int, int]]:
    """Piece ranges in the order an in-place job first overwrites them: the owned shard (phase A),
    then the others (phase C)."""
    j = plan.owned
    shards = ([j] if j is not None else []) + [s for s in range(plan.columns) if s != j]
    return [r for s in shards for r in (plan.piece(s, p) for p in range(plan.pieces)) if r[1] > r[0]]

"""Shared-state election: a pure function from every peer's vote to who sends what to whom.

How it works (the rules ``sync_shared_state`` documents)
1. Candidates. If any peer voted SEND_ONLY, only SEND_ONLY peers are candidates (they are the
   source of truth); otherwise the ENFORCE_POPULAR peers are. RECEIVE_ONLY peers never count. No
   candidate at all is an error for everyone.
2. Revision. The group adopts the highest revision among the candidates (a peer resuming from a
   newer checkpoint wins over peers starting from scratch).
3. Layout. Among candidates at that revision, the most common layout (key names, dtypes, shapes,
   inequality flags) is the reference, ties broken by the smallest peer id. Every peer whose
   layout differs gets an error naming the first differing key and takes no further part.
4. Content. Per key, the digest held by most candidates at the adopted revision wins, ties broken
   by the smallest digest bytes. A SEND_ONLY peer that is behind or holds a losing digest gets an
   error (it may not receive).
5. Transfer. Every other peer fetches each key whose digest differs from the winner; keys that
   allow content inequality are fetched only by peers whose revision differs. Holders of a key
   are the peers at the adopted revision holding the winning digest, in ascending id order.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pccl.enums import SyncStrategy


@dataclass(frozen=True)
class KeyVote:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: bytes
    allow_inequality: bool

    def layout(self) -> tuple:
        return (self.name, self.dtype, self.shape, self.nbytes, self.allow_inequality)


@dataclass(frozen=True)
class Vote:
    strategy: SyncStrategy
    revision: int
    keys: tuple[KeyVote, ...]  # sorted by name


@dataclass(frozen=True)
class Fetch:
    key: int  # index in the sorted key list
    holders: tuple[int, ...]
    digest: bytes  # the elected content's hash, re-verified by the receiver


@dataclass(frozen=True)
class Outcome:
    error: str  # "" when the peer takes part
    fetch: tuple[Fetch, ...] = ()


@dataclass(frozen=True)
class Plan:
    revision: int
    outcomes: dict[int, Outcome]

    @property
    def transfers(self) -> bool:
        return any(o.fetch for o in self.outcomes.values())

    def holders(self) -> set[int]:
        return {h for o in self.outcomes.values() for f in o.fetch for h in f.holders}


def _describe(k: KeyVote) -> str:
    return f"{k.dtype} {list(k.shape)}" + (" (content inequality allowed)" if k.allow_inequality else "")


def _layout_error(mine: tuple[KeyVote, ...], ref: tuple[KeyVote, ...]) -> str:
    ours = {k.name: k for k in mine}
    theirs = {k.name: k for k in ref}
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a is None:
            return f"shared state key {name!r} is missing on this peer (the group has it as {_describe(b)})"
        if b is None:
            return f"shared state key {name!r} is not part of the group's state ({_describe(a)} here)"
        if a.layout() != b.layout():
            return f"shared state key {name!r} is {_describe(a)} here but {_describe(b)} in the group"
    return ""  # pragma: no cover - only called for differing layouts


def elect(votes: dict[int, Vote]) -> Plan:
    """Decide the adopted revision and every peer's transfers (see the module docstring)."""
    send_only = [p for p, v in votes.items() if v.strategy is SyncStrategy.SEND_ONLY]
    candidates = send_only or [p for p, v in votes.items() if v.strategy is SyncStrategy.ENFORCE_POPULAR]
    if not candidates:
        why = "no peer offers the shared state: every peer called sync_shared_state with RECEIVE_ONLY"
        return Plan(0, {p: Outcome(why) for p in votes})
    revision = max(votes[p].revision for p in candidates)
    at_rev = sorted(p for p in candidates if votes[p].revision == revision)
    layouts = Counter(tuple(k.layout() for k in votes[p].keys) for p in at_rev)
    best = max(layouts.values())
    ref_peer = min(p for p in at_rev if layouts[tuple(k.layout() for k in votes[p].keys)] == best)
    ref = votes[ref_peer].keys
    ref_layout = tuple(k.layout() for k in ref)

    outcomes: dict[int, Outcome] = {}
    for p, v in votes.items():
        if tuple(k.layout() for k in v.keys) != ref_layout:
            outcomes[p] = Outcome(_layout_error(v.keys, ref))
    electors = [p for p in at_rev if p not in outcomes]
    winners: list[bytes] = []
    for i in range(len(ref)):
        counts = Counter(votes[p].keys[i].digest for p in electors)
        top = max(counts.values())
        winners.append(min(d for d, c in counts.items() if c == top))
    needs: dict[int, list[int]] = {}
    for p, v in votes.items():
        if p in outcomes:
            continue
        behind = v.revision != revision
        needs[p] = [i for i, k in enumerate(v.keys)
                    if k.digest != winners[i] and (behind or not k.allow_inequality)]
        if v.strategy is SyncStrategy.SEND_ONLY and (behind or needs[p]):
            what = (f"is at revision {v.revision}, behind the group's {revision}" if behind else
                    f"holds content for key {ref[needs[p][0]].name!r} that differs from the elected content")
            outcomes[p] = Outcome(f"this SEND_ONLY peer {what}; a SEND_ONLY peer never receives")
            del needs[p]
    holders = [tuple(sorted(p for p in needs if votes[p].revision == revision
                            and votes[p].keys[i].digest == winners[i])) for i in range(len(ref))]
    for p, idx in needs.items():
        orphan = next((i for i in idx if not holders[i]), None)
        if orphan is not None:  # only when SEND_ONLY peers disagree with each other
            outcomes[p] = Outcome(f"no peer that may send holds the elected content of shared state key "
                                  f"{ref[orphan].name!r} (the SEND_ONLY peers disagree)")
        else:
            outcomes[p] = Outcome("", tuple(Fetch(i, holders[i], winners[i]) for i in idx))
    return Plan(revision, outcomes)

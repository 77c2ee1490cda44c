"""The invariant checker: a pure function over the event records of a campaign.

How it works
1. Peers report JSON records (``chaos.workload``); the controller tags each with its ``cell``
   (one master and its peers run one workload) and ``slot`` and adds its own records (a peer
   silent too long, a peer that did not exit in time). ``check()`` reads only these records.
2. Invariant 1, exact and identical collectives: every ``op`` record must say ``exact`` (the
   peer compared the result with the answer it knows from the peer ids), and all records of one
   ``(cell, key)`` must carry one digest. The key is (master epoch, world revision, op index in
   that revision) for raw all-reduces and (epoch, world revision, outer step) for DiLoCo's θᵍ,
   so records with one key belong to one collective seen by its participants.
3. Invariant 2, identical shared state: all ``sync`` records of one ``(cell, key)`` (key: epoch,
   shared-state revision) must carry one hash, and a peer that already held the state (not its
   first sync on this communicator) must not have received bytes (``rx`` > 0 means it had
   drifted: its all-reduce results differed from the others').
4. Invariant 3, no hang: every record with ``seconds`` and ``deadline`` must satisfy
   seconds <= deadline + slack; ``hang`` records (a peer's watchdog saw a call outlive its
   deadline) and the controller's ``silent`` / ``no_exit`` records are hangs too.
5. Invariant 4, training makes progress: per DiLoCo cell, the median training loss of the last
   tenth of the steps must be below the median of the first tenth.
6. A peer that lost its communicator (``lost``) must name a typed pccl error (Kicked or
   MasterUnreachable); anything else is an unclear error.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Iterable

CLEAR_ERRORS = ("Kicked", "MasterUnreachable")
TIMED = ("op", "sync", "fail", "call", "step")
COLLECTIVE_CALLS = ("all_reduce", "sync", "DiLoCo")  # failed calls that count as aborted collectives


def _key(ev: dict) -> tuple:
    return (ev.get("cell", 0), *ev["key"])


def check(events: Iterable[dict], slack: float = 10.0, min_loss_steps: int = 10) -> dict:
    """Summarize a campaign's records and count violations of the invariants (module docstring)."""
    digests: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    outers: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    hashes: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    losses: dict[int, list[tuple[float, int, float]]] = defaultdict(list)
    mismatches: list[str] = []
    hangs: list[str] = []
    lost: dict[str, int] = defaultdict(int)
    unclear: list[str] = []
    aborted = steps = 0
    for ev in events:
        kind = ev.get("ev")
        who = f"cell {ev.get('cell', 0)} slot {ev.get('slot', '?')} peer {ev.get('peer', '?')}"
        if kind == "op":
            digests[_key(ev)][ev["digest"]].append(ev.get("peer"))
            if not ev.get("exact", False):
                mismatches.append(f"inexact all-reduce result at {ev['key']} on {who}")
        elif kind == "outer":
            outers[_key(ev)][ev["digest"]].append(ev.get("peer"))
        elif kind == "sync":
            hashes[_key(ev)][ev["hash"]].append(ev.get("peer"))
            if not ev.get("fresh", True) and ev.get("rx", 0) > 0:
                mismatches.append(f"shared state drifted on {who}: it received {ev['rx']} bytes at {ev['key']}")
        elif kind == "step":
            steps += int(ev.get("n", 1))
            if "loss" in ev:
                losses[ev.get("cell", 0)].append((ev.get("t", 0.0), ev.get("gstep", 0), float(ev["loss"])))
        elif kind == "fail" and ev.get("what") in COLLECTIVE_CALLS:
            aborted += 1
        elif kind == "hang":
            hangs.append(f"{who}: {ev.get('what', '?')} still running after {ev.get('seconds', 0):.1f} s "
                         f"(deadline {ev.get('deadline', 0):.1f} s)")
        elif kind in ("silent", "no_exit"):
            hangs.append(f"{who}: {ev.get('detail', kind)}")
        elif kind == "lost":
            err = ev.get("error", "?")
            lost[err] += 1
            if err not in CLEAR_ERRORS:
                unclear.append(f"{who}: {err}: {ev.get('message', '')}")
        if kind in TIMED and "seconds" in ev and "deadline" in ev and ev["seconds"] > ev["deadline"] + slack:
            hangs.append(f"{who}: {ev.get('what', kind)} took {ev['seconds']:.1f} s, deadline {ev['deadline']:.1f} s")
        if kind == "step" and ev.get("extra_attempts"):
            aborted += int(ev["extra_attempts"])
    for table, what in ((digests, "all-reduce"), (outers, "DiLoCo outer step"), (hashes, "shared state")):
        for key, by_digest in table.items():
            if len(by_digest) > 1:
                detail = "; ".join(f"{d[:12]}: peers {sorted(p for p in peers if p is not None)}"
                                   for d, peers in by_digest.items())
                mismatches.append(f"{what} {list(key)} differs between peers: {detail}")
    loss = {}
    for cell, rows in sorted(losses.items()):
        rows.sort()
        if len(rows) < min_loss_steps:
            loss[str(cell)] = {"first": None, "last": None, "falling": False, "steps": len(rows)}
            continue
        w = max(5, len(rows) // 10)
        first = statistics.median(r[2] for r in rows[:w])
        last = statistics.median(r[2] for r in rows[-w:])
        loss[str(cell)] = {"first": round(first, 4), "last": round(last, 4), "falling": last < first,
                           "steps": len(rows)}
    return {
        "collectives_completed": len(digests) + len(outers),
        "allreduces_completed": len(digests),
        "outer_steps_completed": len(outers),
        "syncs_completed": len(hashes),
        "collectives_aborted": aborted,
        "peer_steps": steps,
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:10],
        "hangs": len(hangs),
        "hang_examples": hangs[:10],
        "lost": dict(lost),
        "unclear_errors": len(unclear),
        "unclear_examples": unclear[:10],
        "loss": loss,
        "loss_falling": all(v["falling"] for v in loss.values()) if loss else None,
    }


def work_rate(events: Iterable[dict], t0: float, t1: float) -> dict[str, float]:
    """Work per second inside [t0, t1): distinct all-reduces and the sum of peers' DiLoCo inner steps."""
    keys: dict[str, set] = defaultdict(set)
    steps: dict[str, int] = defaultdict(int)
    for ev in events:
        t = ev.get("t", 0.0)
        if not t0 <= t < t1:
            continue
        if ev.get("ev") == "op":
            keys[f"allreduce/{ev.get('cell', 0)}"].add(tuple(ev["key"]))
        elif ev.get("ev") == "step":
            steps[f"diloco/{ev.get('cell', 0)}"] += int(ev.get("n", 1))
    span = max(t1 - t0, 1e-9)
    out = {k: len(v) / span for k, v in keys.items()}
    out.update({k: v / span for k, v in steps.items()})
    return out


def throughput_kept(faulty: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Per workload cell, the faulty run's rate as a fraction of the fault-free run's."""
    return {k: faulty.get(k, 0.0) / v for k, v in baseline.items() if v > 0}

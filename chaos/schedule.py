"""The fault schedule: a pure function from (scenario, seed, duration, knobs) to a list of faults.

How it works
1. ``plan()`` seeds one ``random.Random`` with the scenario name and the seed (a string seed is
   hashed with SHA-512 by ``random``, so the list is the same on every machine and Python run)
   and lays faults out on the campaign's clock: second 0 is the moment every initial peer has
   joined ("settled"), the last fault starts before ``duration``.
2. A fault never names a process: ``pick`` is a large random integer that the controller maps
   onto the peers that are eligible *at injection time* (``pick % len(eligible)``), because which
   peers are alive then depends on the run. Everything else (when, what, how long, how many, the
   rate or drop probability) is decided here, so two campaigns with one seed inject the same
   faults at the same offsets.
3. Kinds: ``kill`` (SIGKILL, a replacement is spawned at once), ``stop`` (SIGSTOP for
   ``duration`` s, then SIGCONT), ``join`` (``count`` newcomers at once that leave gracefully
   after ``duration`` s), ``slow`` (the peer's link rate-limited to ``param`` bit/s for
   ``duration`` s), ``lossy`` (drop probability ``param`` on the peer's link), ``partition``
   (the peer's link down for ``duration`` s), ``master`` (the master SIGKILLed and a new one
   started on the same port ``duration`` s later).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

KINDS = ("kill", "stop", "join", "slow", "lossy", "partition", "master")
NETNS_KINDS = ("slow", "lossy", "partition")
SCENARIOS = {
    "none": (),
    "kill-loop": ("kill",),
    "stop-loop": ("stop",),
    "join-storm": ("join",),
    "slow-link": ("slow",),
    "lossy-link": ("lossy",),
    "partition": ("partition",),
    "master-restart": ("master",),
    "mix": ("kill", "stop", "join"),  # + NETNS_KINDS with --netns, + "master" with --with-master-restart
}


@dataclass(frozen=True)
class Fault:
    at: float           # seconds after the campaign settled
    kind: str
    pick: int           # selects the victim among the eligible peers at injection time
    duration: float = 0.0
    count: int = 1
    param: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Knobs:
    """Periods and ranges of every scenario (seconds unless said otherwise)."""

    kill_every: float = 10.0
    stop_every: float = 12.0
    #: SIGSTOP lengths are drawn from [peer_timeout + stop_min_extra, peer_timeout + stop_max_extra]
    peer_timeout: float = 4.0
    stop_min_extra: float = 0.5
    stop_max_extra: float = 3.5
    join_every: float = 20.0
    join_count: int = 0          # 0: as many newcomers as there are peers (at most 6)
    link_every: float = 15.0
    link_min: float = 3.0
    link_max: float = 8.0
    slow_rate_bits: float = 20e6
    lossy_min: float = 0.01
    lossy_max: float = 0.05
    partition_max_extra: float = 4.0  # partitions last 1 s .. peer_timeout + this
    master_every: float = 30.0
    master_down_min: float = 0.5
    master_down_max: float = 3.0
    mix_every: float = 8.0


def mix_kinds(netns: bool, with_master_restart: bool) -> tuple[str, ...]:
    kinds = SCENARIOS["mix"] + (NETNS_KINDS if netns else ())
    return kinds + (("master",) if with_master_restart else ())


def _fault(kind: str, at: float, rng: random.Random, peers: int, k: Knobs) -> Fault:
    pick = rng.randrange(1 << 30)
    if kind == "kill":
        return Fault(at, kind, pick)
    if kind == "stop":
        d = rng.uniform(k.peer_timeout + k.stop_min_extra, k.peer_timeout + k.stop_max_extra)
        return Fault(at, kind, pick, round(d, 3))
    if kind == "join":
        count = k.join_count or min(max(peers, 2), 6)
        life = rng.uniform(0.5, 0.7) * (k.join_every if k.join_every > 0 else 10.0)
        return Fault(at, kind, pick, round(life, 3), count=count)
    if kind == "slow":
        return Fault(at, kind, pick, round(rng.uniform(k.link_min, k.link_max), 3), param=k.slow_rate_bits)
    if kind == "lossy":
        return Fault(at, kind, pick, round(rng.uniform(k.link_min, k.link_max), 3),
                     param=round(rng.uniform(k.lossy_min, k.lossy_max), 4))
    if kind == "partition":
        return Fault(at, kind, pick, round(rng.uniform(1.0, k.peer_timeout + k.partition_max_extra), 3))
    if kind == "master":
        return Fault(at, kind, pick, round(rng.uniform(k.master_down_min, k.master_down_max), 3))
    raise ValueError(f"unknown fault kind {kind!r}")


def _period(kind: str, k: Knobs) -> float:
    return {"kill": k.kill_every, "stop": k.stop_every, "join": k.join_every, "slow": k.link_every,
            "lossy": k.link_every, "partition": k.link_every, "master": k.master_every}[kind]


def plan(scenario: str, seed: int, duration: float, peers: int, knobs: Knobs | None = None, *,
         netns: bool = False, with_master_restart: bool = False) -> list[Fault]:
    """Every fault of a campaign, in time order. Raises ValueError for an unknown scenario or bad numbers."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if duration <= 0 or peers < 1:
        raise ValueError("duration must be > 0 and peers >= 1")
    k = knobs or Knobs()
    rng = random.Random(f"pccl-chaos:{scenario}:{seed}")
    if scenario == "none":
        return []
    if scenario == "mix":
        kinds = mix_kinds(netns, with_master_restart)
        period = k.mix_every
    else:
        kinds = SCENARIOS[scenario]
        period = _period(kinds[0], k)
    if period <= 0:
        raise ValueError("fault periods must be > 0")
    faults, at = [], period
    while at < duration:
        faults.append(_fault(rng.choice(kinds), round(at, 3), rng, peers, k))
        at += period
    return faults


def counts(faults: list[Fault]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in faults:
        out[f.kind] = out.get(f.kind, 0) + 1
    return out

"""All timeouts and limits in one place, with ``PCCL_*`` environment overrides parsed here only.

Every blocking call in pccl takes its deadline from a :class:`Config` (or an explicit ``timeout=``);
``None`` never means "forever".
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Mapping

from pccl.errors import InvalidUsage


#: Fields where 0 is meaningful (it switches the feature off).
_ZERO_ALLOWED = frozenset({"master_reconnect_timeout"})


@dataclass(frozen=True)
class Config:
    """Timeouts (seconds) and limits shared by the master and the peers."""

    #: Interval between heartbeats on the control channel (both directions).
    heartbeat_interval: float = 0.5
    #: A peer silent this long is declared dead by the master.
    peer_timeout: float = 4.0
    #: A master silent this long makes the peer raise MasterUnreachable.
    master_timeout: float = 6.0
    #: How long ``connect()`` waits to be admitted (the accepted peers must call update_topology).
    join_timeout: float = 300.0
    #: How long ``update_topology()`` waits for the other peers' votes and for its links.
    topology_timeout: float = 120.0
    #: Default deadline of one collective, from announcement to verdict.
    op_timeout: float = 120.0
    #: Deadline of a short request/response exchange with the master.
    request_timeout: float = 10.0
    #: Deadline for opening a data connection and completing its handshake.
    connect_timeout: float = 5.0
    #: Largest control message accepted (bytes).
    max_control_message: int = 1 << 20
    #: Largest single data frame payload accepted (bytes).
    max_frame_bytes: int = 1 << 30
    #: Sub-chunk size of the pipelined ring (bytes).
    pipeline_bytes: int = 4 << 20
    #: Data connections opened at once that have not finished their handshake.
    max_half_open: int = 64
    #: Collectives in flight at once per communicator.
    max_in_flight: int = 16
    #: Duration of one bandwidth probe of optimize_topology (one directed pair).
    probe_seconds: float = 1.0
    #: After the control connection to the master is lost (the master died or restarted), how
    #: long the peer keeps re-registering before it raises MasterUnreachable; 0 disables the
    #: ride-through (the first loss raises MasterUnreachable).
    master_reconnect_timeout: float = 60.0
    #: Delay before the first re-registration attempt; it doubles after each failed attempt...
    master_reconnect_backoff: float = 0.1
    #: ...up to this cap.
    master_reconnect_backoff_max: float = 2.0
    #: After re-registering with a restarted master, how long a peer waits for the other members
    #: of its former group to re-register before the group goes on without them.
    master_regroup_timeout: float = 15.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _ZERO_ALLOWED and type(v) in (int, float) and v == 0:
                continue
            if f.type in ("int", int):
                if type(v) is not int or v <= 0:
                    raise InvalidUsage(f"config {f.name} must be a positive int, got {v!r}")
            elif type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
                raise InvalidUsage(f"config {f.name} must be a positive finite number, got {v!r}")
        if self.peer_timeout <= self.heartbeat_interval:
            raise InvalidUsage("config peer_timeout must be larger than heartbeat_interval")
        if self.master_reconnect_backoff_max < self.master_reconnect_backoff:
            raise InvalidUsage("config master_reconnect_backoff_max must be at least master_reconnect_backoff")

    def replace(self, **changes: float) -> "Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: float) -> "Config":
        """Defaults, then ``PCCL_<FIELD>`` variables (e.g. ``PCCL_PEER_TIMEOUT=2``), then overrides."""
        env = os.environ if env is None else env
        values: dict[str, float] = {}
        for f in fields(cls):
            raw = env.get("PCCL_" + f.name.upper())
            if raw is None:
                continue
            try:
                values[f.name] = int(raw) if f.type in ("int", int) else float(raw)
            except ValueError as exc:
                raise InvalidUsage(f"PCCL_{f.name.upper()}={raw!r} is not a number") from exc
        values.update(overrides)
        return cls(**values)


def resolve(config: Config | None) -> Config:
    return Config.from_env() if config is None else config


__all__ = ["Config", "resolve"]

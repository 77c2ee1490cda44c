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
    #: AUTO's cost model (ALGORITHMS.md §6, docs/benchmarks.md): seconds per message hop (alpha),
    #: link bandwidth inside one locality and between localities, and reduction speed (bytes/s).
    alpha_seconds: float = 5e-4
    link_bytes_per_second: float = 1e9
    wan_bytes_per_second: float = 1.25e8
    reduce_bytes_per_second: float = 2e9

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                if type(v) is not int or v <= 0:
                    raise InvalidUsage(f"config {f.name} must be a positive int, got {v!r}")
            elif type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
                raise InvalidUsage(f"config {f.name} must be a positive finite number, got {v!r}")
        if self.peer_timeout <= self.heartbeat_interval:
            raise InvalidUsage("config peer_timeout must be larger than heartbeat_interval")

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

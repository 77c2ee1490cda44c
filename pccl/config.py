"""All timeouts and limits in one place, with ``PCCL_*`` environment overrides parsed here only.

Every blocking call in pccl takes its deadline from a :class:`Config` (or an explicit ``timeout=``);
``None`` never means "forever".

The shared secret (``PCCL_SECRET``, ``secret=``, ``pccl master --secret-file``) lives here too, as
bytes; it is kept out of ``repr()`` so a logged config never shows it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Mapping

from pccl.errors import InvalidUsage


#: Fields where 0 is meaningful (it switches the feature off).
_ZERO_ALLOWED = frozenset({"master_reconnect_timeout", "bucket_bytes", "local_send_buffer"})


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
    #: SO_SNDBUF (bytes) of data connections whose two ends are on one host (loopback, see
    #: transports.links.same_host); 0 leaves it to the kernel. The kernel's autotuned buffers
    #: (up to net.ipv4.tcp_wmem's 4 MiB) made a 64 MiB ring 9-12 % slower on one 2-core VM
    #: (docs/benchmarks.md). Keep it well above the loopback device's largest packet (64 KiB
    #: unless BIG TCP is on): at 32 KiB each connection waited for delayed ACKs, 16 MiB took 4.7 s.
    #: Connections between hosts are never changed (a small buffer would cap a long path).
    local_send_buffer: int = 256 << 10
    #: Collectives in flight at once per communicator.
    max_in_flight: int = 16
    #: all_reduce_many coalesces unquantized tensors smaller than this into buckets of up to this
    #: many bytes, one collective per bucket (pccl.coalesce); 0: one collective per tensor.
    bucket_bytes: int = 4 << 20
    #: Duration of one bandwidth probe of optimize_topology (one directed pair).
    probe_seconds: float = 1.0
    #: AUTO's cost model (ALGORITHMS.md §6, docs/benchmarks.md): seconds per message hop (alpha),
    #: link bandwidth inside one locality and between localities, and reduction speed (bytes/s).
    alpha_seconds: float = 5e-4
    link_bytes_per_second: float = 1e9
    wan_bytes_per_second: float = 1.25e8
    reduce_bytes_per_second: float = 2e9
    #: Messages queued per control connection in each direction (zmq SNDHWM/RCVHWM).
    max_control_queue: int = 10000
    #: Shared secret every connection must prove (HMAC challenge-response); None: no authentication.
    #: Never shown by repr(); set it with ``secret=``, ``PCCL_SECRET`` or ``--secret-file``.
    secret: bytes | None = field(default=None, repr=False)
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
        if self.secret is not None:
            object.__setattr__(self, "secret", secret_bytes(self.secret))
        for f in fields(self):
            if f.name == "secret":
                continue
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

    def replace(self, **changes: object) -> "Config":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: float) -> "Config":
        """Defaults, then ``PCCL_<FIELD>`` variables (e.g. ``PCCL_PEER_TIMEOUT=2``), then overrides.

        ``PCCL_SECRET`` (non-empty) sets the shared secret; an empty value means none.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get("PCCL_" + f.name.upper())
            if raw is None:
                continue
            if f.name == "secret":
                if raw:
                    values["secret"] = raw.encode()
                continue
            try:
                values[f.name] = int(raw) if f.type in ("int", int) else float(raw)
            except ValueError as exc:
                raise InvalidUsage(f"PCCL_{f.name.upper()}={raw!r} is not a number") from exc
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def secret_bytes(secret: object) -> bytes:
    """The secret as bytes (a str is UTF-8 encoded). Raises InvalidUsage for an empty or non-text
    secret; the message never contains the value."""
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise InvalidUsage("the secret must be a non-empty str or bytes")
    return bytes(secret)


def read_secret_file(path: str) -> bytes:
    """Read a secret from a file (surrounding whitespace and the trailing newline are dropped).
    Raises InvalidUsage if it cannot be read or is empty (the message names the file, never the value)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(1 << 16).strip()
    except OSError as exc:
        raise InvalidUsage(f"cannot read the secret file {path}: {exc.strerror}") from None
    if not raw:
        raise InvalidUsage(f"the secret file {path} is empty")
    return raw


def resolve(config: Config | None, secret: str | bytes | None = None,
            env: Mapping[str, str] | None = None) -> Config:
    """The config to use: ``config`` (None: :meth:`Config.from_env`), with the secret taken from
    ``secret`` if given, else the config's own, else ``PCCL_SECRET``."""
    env = os.environ if env is None else env
    cfg = Config.from_env(env) if config is None else config
    if secret is not None:
        return cfg.replace(secret=secret_bytes(secret))
    if cfg.secret is None and env.get("PCCL_SECRET"):
        return cfg.replace(secret=env["PCCL_SECRET"].encode())
    return cfg


__all__ = ["Config", "read_secret_file", "resolve", "secret_bytes"]

"""Control-plane messages and their one strict codec.

How it works
1. Every message is a frozen dataclass registered under a short type tag.
2. On the wire a message is the msgpack array ``[PROTOCOL_VERSION, tag, {field: value}]``.
3. ``decode`` checks the version, the tag, that the field set is exactly the dataclass's, and every
   field's type (from the annotations: int, float, str, bool, bytes, tuple[T, ...], nested message
   records). Any defect, including oversize input, raises ``ProtocolError`` and nothing else.

Integers are non-negative and below 2**63 everywhere in this protocol; the codec enforces it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import msgpack

from pccl.errors import ProtocolError

PROTOCOL_VERSION = 2  # 2: Topology carries the measured link rates
_INT_MAX = (1 << 63) - 1

_REGISTRY: dict[str, type] = {}
_RECORDS: set[type] = set()
_HINTS: dict[type, dict[str, Any]] = {}


def message(tag: str):
    """Register a frozen dataclass as a control message under ``tag``."""

    def wrap(cls: type) -> type:
        cls = dataclass(frozen=True)(cls)
        if tag in _REGISTRY:
            raise RuntimeError(f"duplicate message tag {tag}")
        cls.TAG = tag  # type: ignore[attr-defined]
        _REGISTRY[tag] = cls
        return cls

    return wrap


def record(cls: type) -> type:
    """Register a frozen dataclass that may appear nested inside messages."""
    cls = dataclass(frozen=True)(cls)
    _RECORDS.add(cls)
    return cls


# --------------------------------------------------------------------------- records
@record
class Member:
    """One accepted peer as the topology describes it."""

    peer_id: int
    group: int
    host: str
    port: int
    locality: str


@record
class GroupRates:
    """What optimize_topology measured in one peer group, as AUTO's cost model uses it: the
    slowest directed pair inside a locality and the slowest between two localities, in bytes
    per second (0.0: no such pair measured)."""

    group: int
    inside: float
    between: float


@record
class KeyRec:
    """One shared-state key as a sync vote describes it (digest: XXH3-128 of its bytes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: bytes
    allow_inequality: bool


@record
class FetchRec:
    """A key (index in sorted key order) a peer must download, the peers that hold it, and the
    elected content's hash."""

    key: int
    holders: tuple[int, ...]
    digest: bytes


# --------------------------------------------------------------------------- authentication
# With a shared secret, a connection starts with AuthHello -> AuthChallenge -> AuthProof (then its
# Register or StatusQuery); see transports.auth. Nonces and proofs are 32 bytes.
@message("auth_hello")
class AuthHello:
    """peer -> master: the first message of an authenticating connection."""

    nonce: bytes


@message("auth_challenge")
class AuthChallenge:
    """master -> peer: the master's nonce and its proof of the secret."""

    nonce: bytes
    proof: bytes


@message("auth_proof")
class AuthProof:
    """peer -> master: the peer's proof of the secret."""

    proof: bytes


@message("auth_failed")
class AuthFailed:
    """master -> peer: authentication was refused (the reason never contains the secret)."""

    reason: str


# --------------------------------------------------------------------------- peer -> master
@message("register")
class Register:
    """``rejoin``: this peer was a member of its group when its master connection was lost (the
    master restarted); topology votes with ``admit=False`` still admit it. ``former_master``: the
    ``Registered.master`` of the master it lost (0: unknown); a master that finds its own id there
    did not restart, it removed this peer, and refuses the registration."""

    group: int
    data_host: str
    data_port: int
    locality: str
    name: str
    rejoin: bool = False
    former_master: int = 0


@message("heartbeat")
class Heartbeat:
    pass


@message("leave")
class Leave:
    pass


@message("pending_query")
class PendingQuery:
    req: int


@message("vote_topology")
class VoteTopology:
    """The peer waits in update_topology (``optimize``: optimize_topology, measure links first;
    ``admit`` false: only drop dead peers, keep pending ones waiting)."""

    optimize: bool
    admit: bool


@message("announce")
class Announce:
    """A peer wants to run collective ``tag`` with these arguments (the master checks agreement);
    a non-empty ``error`` (e.g. non-finite input to a quantized op) fails it on every peer."""

    tag: int
    kind: str
    count: int
    dtype: str
    op: str
    algorithm: str
    quantization: str
    error: str


@message("withdraw")
class Withdraw:
    """The peer gave up waiting for ``tag`` (its deadline passed)."""

    tag: int


@message("op_report")
class OpReport:
    """The peer's local part of op ``seq`` finished (ok) or failed (kind/message say why)."""

    seq: int
    ok: bool
    kind: str
    message: str


@message("status_query")
class StatusQuery:
    req: int


@message("sync_vote")
class SyncVote:
    """The peer's shared state for the election; a non-empty ``error`` means it sits this one out
    (the master answers it with ``OpFailed`` and elects among the others)."""

    revision: int
    strategy: str
    keys: tuple[KeyRec, ...]
    error: str


@message("sync_report")
class SyncReport:
    """A receiving peer finished downloading (ok) or gave up (message says why)."""

    seq: int
    ok: bool
    message: str


@message("probe_result")
class ProbeResult:
    """Measured bandwidth from the reporting peer to ``target`` (0.0: the probe failed)."""

    round: int
    target: int
    bytes_per_second: float


# --------------------------------------------------------------------------- master -> peer
@message("registered")
class Registered:
    """``master``: this master process's random incarnation id (0: unknown)."""

    peer_id: int
    accepted: bool
    master: int = 0


@message("pending_reply")
class PendingReply:
    """``rejoin``: some pending peer is re-joining after a master restart."""

    req: int
    pending: bool
    rejoin: bool = False


@message("topology")
class Topology:
    """The new world: members in ring order (per group, order of appearance), and per group
    the link bandwidths measured among its members so far (what AUTO's cost model uses; one
    entry per group, so the message stays small however many pairs were measured)."""

    revision: int
    members: tuple[Member, ...]
    rates: tuple[GroupRates, ...] = ()


@message("commence")
class Commence:
    tag: int
    seq: int
    revision: int
    participants: tuple[int, ...]


@message("op_failed")
class OpFailed:
    """Collective ``tag`` was refused before it commenced."""

    tag: int
    kind: str
    message: str


@message("verdict")
class Verdict:
    """The master's single decision on op ``seq``: commit (ok) or abort."""

    seq: int
    ok: bool
    kind: str
    message: str


@message("peer_down")
class PeerDown:
    """An accepted peer of the receiver's world died or left (links to it will never open)."""

    peer_id: int
    reason: str


@message("sync_plan")
class SyncPlan:
    """The election's result for one peer: adopt ``revision``, download ``fetch``; serve the others
    until ``SyncDone`` unless ``final`` (nobody downloads anything)."""

    seq: int
    revision: int
    fetch: tuple[FetchRec, ...]
    final: bool


@message("sync_done")
class SyncDone:
    """Every receiver of sync ``seq`` finished or died: holders stop serving."""

    seq: int


@message("probe")
class Probe:
    """Measure the bandwidth to ``target`` at host:port for about ``seconds`` and report it."""

    round: int
    target: int
    host: str
    port: int
    seconds: float


@message("kicked")
class Kicked:
    reason: str


@message("status_reply")
class StatusReply:
    req: int
    text: str


Message = Any  # any registered message instance


# --------------------------------------------------------------------------- codec
def _hints(cls: type) -> dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        h = typing.get_type_hints(cls)
        h.pop("TAG", None)
        _HINTS[cls] = h
    return h


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def encode(msg: Message) -> bytes:
    """Serialize a registered message (the inverse of :func:`decode`)."""
    tag = getattr(type(msg), "TAG", None)
    if tag is None or _REGISTRY.get(tag) is not type(msg):
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    return msgpack.packb([PROTOCOL_VERSION, tag, _to_wire(msg)], use_bin_type=True)


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{path}: expected a map of fields")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if set(raw) != set(names):
        missing = sorted(set(names) - set(raw))
        extra = sorted(map(str, set(raw) - set(names)))
        raise ProtocolError(f"{path}: fields do not match (missing {missing}, unexpected {extra})")
    return cls(**{n: _check(raw[n], hints[n], f"{path}.{n}") for n in names})


def _check(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is int:
        if type(value) is not int or not 0 <= value <= _INT_MAX:
            raise ProtocolError(f"{path}: expected a non-negative 63-bit int, got {type(value).__name__}")
        return value
    if hint is bool:
        if type(value) is not bool:
            raise ProtocolError(f"{path}: expected bool, got {type(value).__name__}")
        return value
    if hint is float:
        if type(value) is not float:
            raise ProtocolError(f"{path}: expected float, got {type(value).__name__}")
        return value
    if hint is str:
        if type(value) is not str:
            raise ProtocolError(f"{path}: expected str, got {type(value).__name__}")
        return value
    if hint is bytes:
        if type(value) is not bytes:
            raise ProtocolError(f"{path}: expected bytes, got {type(value).__name__}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported tuple hint {hint}")
        if type(value) is not list:
            raise ProtocolError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if hint in _RECORDS:
        return _build(hint, value, path)
    raise TypeError(f"unsupported field type {hint!r} at {path}")


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode(data: bytes, max_size: int = 1 << 20) -> Message:
    """Parse one control message. Raises ``ProtocolError`` for any defect."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("control message must be bytes")
    if len(data) > max_size:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds the {max_size}-byte cap")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext,
            max_bin_len=max_size, max_str_len=max_size,
            max_array_len=1 << 16, max_map_len=1 << 10, max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types for malformed input
        raise ProtocolError(f"undecodable control message: {type(exc).__name__}: {exc}") from exc
    if type(obj) is not list or len(obj) != 3:
        raise ProtocolError("control message must be [version, type, fields]")
    version, tag, body = obj
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    if type(tag) is not str or tag not in _REGISTRY:
        raise ProtocolError(f"unknown message type {tag!r}")
    return _build(_REGISTRY[tag], body, tag)


def registry() -> dict[str, type]:
    return dict(_REGISTRY)


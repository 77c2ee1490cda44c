"""The control-message codec: round trips of every message, and fuzzing that must end in ProtocolError.

Network input may raise ``ProtocolError`` and nothing else; any other exception fails these tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pccl.errors import ProtocolError
from pccl.transports import messages as m

INT_MAX = (1 << 63) - 1
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- strategies from type hints
def hints(cls: type) -> dict[str, Any]:
    h = typing.get_type_hints(cls)
    h.pop("TAG", None)
    return {f.name: h[f.name] for f in dataclasses.fields(cls)}


def value_strategy(hint: Any) -> st.SearchStrategy:
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(min_value=0, max_value=INT_MAX)
    if hint is float:
        return st.floats(allow_nan=False)
    if hint is str:
        return st.text(max_size=30)
    if hint is bytes:
        return st.binary(max_size=30)
    if typing.get_origin(hint) is tuple:
        (inner, _ellipsis) = typing.get_args(hint)
        return st.lists(value_strategy(inner), max_size=4).map(tuple)
    if dataclasses.is_dataclass(hint):
        return st.builds(hint, **{n: value_strategy(h) for n, h in hints(hint).items()})
    raise AssertionError(f"no strategy for {hint!r}")


def message_strategy(cls: type) -> st.SearchStrategy:
    return st.builds(cls, **{n: value_strategy(h) for n, h in hints(cls).items()})


REGISTRY = m.registry()
TAGS = sorted(REGISTRY)
any_message = st.sampled_from(TAGS).flatmap(lambda t: message_strategy(REGISTRY[t]))


def decode_or_reject(data: Any, max_size: int = 1 << 20) -> Any:
    """Decode; a ProtocolError is a fine answer, anything else propagates and fails the test."""
    try:
        msg = m.decode(data, max_size)
    except ProtocolError:
        return None
    # Whatever decodes must be a registered message that survives a second round trip.
    assert REGISTRY.get(type(msg).TAG) is type(msg)
    assert m.decode(m.encode(msg)) == msg
    return msg


def must_reject(data: Any, max_size: int = 1 << 20) -> None:
    with pytest.raises(ProtocolError):
        m.decode(data, max_size)


def wire(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw_of(msg: Any) -> list:
    """The msgpack object ``[version, tag, fields]`` of a valid message."""
    return msgpack.unpackb(m.encode(msg), raw=False)


# --------------------------------------------------------------------------- a test-only message with every field type
@dataclass(frozen=True)
class _AllTypes:
    i: int
    f: float
    s: str
    b: bytes
    flag: bool
    ints: tuple[int, ...]
    members: tuple[m.Member, ...]
    texts: tuple[str, ...]


_ALL_TAG = "__test_all_field_types"


@contextlib.contextmanager
def all_types_registered():
    """Register ``_AllTypes`` for the duration of one check (no message in use has float/bytes fields)."""
    _AllTypes.TAG = _ALL_TAG  # type: ignore[attr-defined]
    assert _ALL_TAG not in m._REGISTRY
    m._REGISTRY[_ALL_TAG] = _AllTypes
    try:
        yield _AllTypes
    finally:
        del m._REGISTRY[_ALL_TAG]
        m._HINTS.pop(_AllTypes, None)


# --------------------------------------------------------------------------- round trips
def test_registry_is_nonempty_and_consistent():
    assert {"register", "heartbeat", "announce", "op_report", "topology", "commence", "verdict",
            "kicked"} <= set(REGISTRY)
    for tag, cls in REGISTRY.items():
        assert cls.TAG == tag
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.PendingQuery(req=1).req = 2  # type: ignore[misc]


@pytest.mark.parametrize("tag", TAGS)
@ROUND_TRIP
@given(data=st.data())
def test_round_trip_every_message(tag, data):
    msg = data.draw(message_strategy(REGISTRY[tag]))
    blob = m.encode(msg)
    assert isinstance(blob, bytes)
    back = m.decode(blob)
    assert type(back) is type(msg)
    assert back == msg
    assert m.encode(back) == blob
    # bytearray and memoryview inputs are accepted too
    assert m.decode(bytearray(blob)) == msg
    assert m.decode(memoryview(blob)) == msg


@ROUND_TRIP
@given(msg=message_strategy(_AllTypes))
def test_round_trip_all_field_types(msg):
    with all_types_registered():
        back = m.decode(m.encode(msg))
    assert back == msg
    assert type(back.members) is tuple and all(type(x) is m.Member for x in back.members)
    assert type(back.b) is bytes and type(back.f) is float and type(back.flag) is bool


def test_int_bounds_are_inclusive():
    for v in (0, 1, INT_MAX):
        assert m.decode(m.encode(m.PendingQuery(req=v))).req == v


def test_nested_members_round_trip_in_order():
    members = tuple(m.Member(peer_id=i, group=i % 2, host=f"10.0.0.{i}", port=1000 + i, locality="l")
                    for i in range(5, 0, -1))
    msg = m.Topology(revision=7, members=members)
    assert m.decode(m.encode(msg)).members == members
    rates = (m.GroupRates(group=0, inside=3e9, between=1.25e8), m.GroupRates(group=1, inside=0.0, between=1e8))
    back = m.decode(m.encode(m.Topology(revision=7, members=members, rates=rates)))
    assert back.rates == rates and back.members == members
    with pytest.raises(ProtocolError):  # a rate must be a float
        m.decode(msgpack.packb([m.PROTOCOL_VERSION, "topology", {"revision": 1, "members": [], "rates": [
            {"group": 0, "inside": 5, "between": 1.0}]}]))


class _NotAMessage:
    TAG = "heartbeat"  # claims a registered tag but is not the registered class


@pytest.mark.parametrize("obj", [object(), {"tag": "heartbeat"}, [1, "heartbeat", {}], b"", None,
                                 m.Member(peer_id=1, group=0, host="h", port=1, locality=""),
                                 _NotAMessage()])
def test_encode_refuses_unregistered_objects(obj):
    with pytest.raises(TypeError):
        m.encode(obj)


# --------------------------------------------------------------------------- fuzz: random bytes
@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_only_protocol_error(data):
    decode_or_reject(data)


@FUZZ
@given(st.lists(st.sampled_from([0x90, 0x91, 0x92, 0x93, 0x80, 0x81, 0x01, 0xa1, 0x61, 0xc0, 0xc2, 0xc3,
                                 0xc4, 0xc7, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xdc, 0xdd, 0xde, 0xdf, 0xff,
                                 0xcf, 0xd3, 0xcb, 0xca, 0xd9, 0xda, 0xdb, 0xc5, 0xc6, 0xc8, 0xc9]),
                max_size=64))
def test_random_msgpack_type_bytes_only_protocol_error(codes):
    decode_or_reject(bytes(codes))


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\xc1",  # never-used msgpack code
    b"\x93\x01",  # truncated array
    b"\x91" * 100_000,  # deep nesting
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
    b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion pairs
    b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
    b"\xc9\xff\xff\xff\xff\x05",  # ext32 claiming 4 GiB
    b"\xc7\x00\x05",  # ext8 of length 0 (reaches the ext hook)
    b"\xd6\xff\x00\x00\x00\x01",  # timestamp ext (-1)
    b"\xd4\xfb\x00",  # fixext1 with a negative (reserved) type
    b"\x93\x01\xa5kicked\x81\xa6reason\xd4\xfb\x00",  # ... nested as a field value
    b"\x93\x01\xa9heartbeat\x80\x00",  # valid heartbeat plus a trailing byte
    b"\x93\x01\xa9heartbeat\x80" * 2,  # two messages in one frame
])
def test_known_bad_inputs(data):
    must_reject(data)


@pytest.mark.parametrize("data", ["text", 12, None, [1, "heartbeat", {}]])
def test_non_bytes_input_is_protocol_error(data):
    must_reject(data)


# --------------------------------------------------------------------------- fuzz: byte-level mutations
@st.composite
def mutated_bytes(draw):
    blob = bytearray(m.encode(draw(any_message)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        if kind == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= draw(st.integers(1, 255))
        elif kind == "set" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] = draw(st.sampled_from([0x00, 0x7f, 0xc0, 0xc1, 0xc2, 0xc3, 0xcf, 0xd3, 0xc7, 0xd4,
                                            0xdd, 0xdf, 0xdb, 0xff]))
        elif kind == "insert":
            i = draw(st.integers(0, len(blob)))
            blob[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            del blob[i:i + draw(st.integers(1, 8))]
        elif kind == "truncate" and blob:
            del blob[draw(st.integers(0, len(blob) - 1)):]
    return bytes(blob)


@FUZZ
@given(mutated_bytes())
def test_mutated_bytes_only_protocol_error(data):
    decode_or_reject(data)


@FUZZ
@given(any_message, st.data())
def test_every_strict_truncation_is_rejected(msg, data):
    blob = m.encode(msg)
    cut = data.draw(st.integers(0, len(blob) - 1))
    must_reject(blob[:cut])


# --------------------------------------------------------------------------- fuzz: structural mutations
EXT = msgpack.ExtType(5, b"\x01\x02")
OTHER_TYPES = [None, True, False, 0, 1, -1, 1 << 63, (1 << 64) - 1, -(1 << 63), 1.5, "", "x", b"", b"x",
               [], [1], {}, {"a": 1}, EXT, msgpack.ExtType(0, b""), msgpack.Timestamp(1, 0)]


def wrong_values(hint: Any) -> list:
    """Values that the codec must refuse for a field of type ``hint``."""
    out = []
    for v in OTHER_TYPES:
        if hint is int and type(v) is int and 0 <= v <= INT_MAX:
            continue
        if hint is bool and type(v) is bool:
            continue
        if hint is str and type(v) is str:
            continue
        if hint is bytes and type(v) is bytes:
            continue
        if hint is float and type(v) is float:
            continue
        if typing.get_origin(hint) is tuple and v == []:
            continue  # an empty list is a valid empty tuple
        out.append(v)
    return out


def mutate_fields(draw, cls: type, body: dict) -> Any:
    """One invalid change to a field map of ``cls`` (recursing into nested records)."""
    h = hints(cls)
    choices = ["extra", "not_a_map", "bytes_key", "non_str_key"]
    if h:
        choices += ["missing", "wrong_type", "wrong_type", "wrong_type"]
    nested = [n for n, t in h.items() if typing.get_origin(t) is tuple and body[n]]
    if nested:
        choices += ["nested", "nested"]
    kind = draw(st.sampled_from(choices))
    body = dict(body)
    if kind == "extra":
        name = draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in h))
        body[name] = draw(st.sampled_from(OTHER_TYPES))
    elif kind == "not_a_map":
        return draw(st.sampled_from([None, 1, "x", [], [list(body.values())], list(body.items())]))
    elif kind == "bytes_key":
        if not body:
            return {b"x": 1}
        name = draw(st.sampled_from(sorted(body)))
        body[name.encode()] = body.pop(name)
    elif kind == "non_str_key":
        body[draw(st.sampled_from([1, -1, 1.5, True, None, EXT]))] = 1
    elif kind == "missing":
        del body[draw(st.sampled_from(sorted(body)))]
    elif kind == "wrong_type":
        name = draw(st.sampled_from(sorted(h)))
        body[name] = draw(st.sampled_from(wrong_values(h[name])))
    elif kind == "nested":
        name = draw(st.sampled_from(nested))
        items = list(body[name])
        i = draw(st.integers(0, len(items) - 1))
        (inner,) = typing.get_args(h[name])[:1]
        if dataclasses.is_dataclass(inner):
            items[i] = mutate_fields(draw, inner, items[i])
        else:
            items[i] = draw(st.sampled_from(wrong_values(inner)))
        body[name] = items
    return body


@st.composite
def structurally_broken(draw):
    msg = draw(any_message)
    version, tag, body = raw_of(msg)
    kind = draw(st.sampled_from(["version", "tag", "fields", "fields", "fields", "envelope"]))
    if kind == "version":
        version = draw(st.sampled_from([0, m.PROTOCOL_VERSION - 1, m.PROTOCOL_VERSION + 1, 255, -1, 1 << 63, "1", 1.0, True, None, b"\x01", [1], EXT]))
    elif kind == "tag":
        tag = draw(st.one_of(st.text(max_size=12).filter(lambda t: t not in REGISTRY),
                             st.sampled_from([tag.encode(), 1, None, True, [tag], EXT, tag.upper() + "_"])))
        assume(not isinstance(tag, str) or tag not in REGISTRY)
    elif kind == "fields":
        body = mutate_fields(draw, type(msg), body)
    else:
        return wire(draw(st.sampled_from([
            [version, tag], [version, tag, body, None], {"v": version, "t": tag}, tag, version, None,
            [version, tag, body, body], [[version, tag, body]], EXT])))
    return wire([version, tag, body])


@FUZZ
@given(structurally_broken())
def test_structurally_broken_messages_are_protocol_errors(data):
    must_reject(data)


@pytest.mark.parametrize("version", [0, m.PROTOCOL_VERSION - 1, m.PROTOCOL_VERSION + 1, 1 << 62])
def test_wrong_version_is_refused_with_clear_message(version):
    with pytest.raises(ProtocolError, match="version"):
        m.decode(wire([version, "heartbeat", {}]))


def test_unknown_tag_missing_and_extra_fields_messages():
    with pytest.raises(ProtocolError, match="unknown message type"):
        m.decode(wire([m.PROTOCOL_VERSION, "no_such_message", {}]))
    with pytest.raises(ProtocolError, match="missing"):
        m.decode(wire([m.PROTOCOL_VERSION, "pending_query", {}]))
    with pytest.raises(ProtocolError, match="unexpected"):
        m.decode(wire([m.PROTOCOL_VERSION, "pending_query", {"req": 1, "other": 2}]))


@pytest.mark.parametrize("value", [True, False, -1, -(1 << 63), 1 << 63, (1 << 64) - 1, 1.0, "1", None, b"1"])
def test_int_field_refuses_non_ints_and_out_of_range(value):
    must_reject(wire([m.PROTOCOL_VERSION, "pending_query", {"req": value}]))


@pytest.mark.parametrize("value", [0, 1, None, "true", 1.0])
def test_bool_field_refuses_non_bools(value):
    must_reject(wire([m.PROTOCOL_VERSION, "registered", {"peer_id": 1, "accepted": value}]))


def test_nested_record_defects_are_protocol_errors():
    good = {"peer_id": 1, "group": 0, "host": "h", "port": 2, "locality": ""}
    ok = wire([m.PROTOCOL_VERSION, "topology", {"revision": 1, "members": [good], "rates": []}])
    assert m.decode(ok).members[0].port == 2
    for bad_member in ([1, 0, "h", 2, ""], {**good, "port": -1}, {**good, "host": b"h"},
                       {k: v for k, v in good.items() if k != "host"}, {**good, "x": 0}, {**good, "port": EXT},
                       {**good, "peer_id": True}, None):
        must_reject(wire([m.PROTOCOL_VERSION, "topology", {"revision": 1, "members": [good, bad_member], "rates": []}]))
    must_reject(wire([m.PROTOCOL_VERSION, "topology", {"revision": 1, "members": good, "rates": []}]))
    must_reject(wire([m.PROTOCOL_VERSION, "topology", {"revision": 1, "members": [good]}]))  # no rates
    for bad in ({"group": 0, "inside": "fast", "between": 1.0}, {"group": -1, "inside": 1.0, "between": 1.0},
                {"group": 0, "inside": 1.0}, [0, 1.0, 1.0]):
        must_reject(wire([m.PROTOCOL_VERSION, "topology", {"revision": 1, "members": [good], "rates": [bad]}]))
    must_reject(wire([m.PROTOCOL_VERSION, "commence",
                      {"tag": 1, "seq": 1, "revision": 1, "participants": [1, -2]}]))
    must_reject(wire([m.PROTOCOL_VERSION, "commence",
                      {"tag": 1, "seq": 1, "revision": 1, "participants": [1, [2]]}]))


@pytest.mark.parametrize("ext", [msgpack.ExtType(1, b""), msgpack.ExtType(100, b"abc"),
                                 msgpack.ExtType(127, b"x" * 300),
                                 msgpack.Timestamp(0, 1)])
def test_ext_types_anywhere_are_protocol_errors(ext):
    V = m.PROTOCOL_VERSION
    good = {"peer_id": 1, "group": 0, "host": "h", "port": 2, "locality": ""}
    for obj in (ext, [V, ext, {}], [V, "heartbeat", ext], [V, "kicked", {"reason": ext}],
                [V, "heartbeat", {}, ext], [V, "topology", {"revision": 1, "members": [{**good, "host": ext}], "rates": []}],
                [V, "commence", {"tag": 1, "seq": 1, "revision": 1, "participants": [1, [ext]]}],
                [V, "kicked", {"reason": "x", ext: 1}]):
        must_reject(wire(obj))


def test_float_and_bytes_fields_are_strict():
    base = {"i": 1, "f": 1.0, "s": "", "b": b"", "flag": False, "ints": [], "members": [], "texts": []}
    V = m.PROTOCOL_VERSION
    with all_types_registered():
        assert m.decode(wire([V, _ALL_TAG, base])).f == 1.0
        check_all_types_refusals(base)
    must_reject(wire([V, _ALL_TAG, base]))  # unregistered again


def check_all_types_refusals(base: dict) -> None:
    V = m.PROTOCOL_VERSION
    for name, bad in [("f", 1), ("f", True), ("f", "1.0"), ("b", "str"), ("b", 1),
                      ("s", b"bytes"), ("ints", [1, True]), ("texts", [b"x"]), ("ints", {})]:
        must_reject(wire([V, _ALL_TAG, {**base, name: bad}]))


# --------------------------------------------------------------------------- size caps
@given(any_message)
@settings(max_examples=50, deadline=None)
def test_oversize_input_is_refused(msg):
    blob = m.encode(msg)
    assert m.decode(blob, max_size=len(blob)) == msg
    must_reject(blob, max_size=len(blob) - 1)


def test_default_cap_refuses_a_large_message():
    blob = m.encode(m.Kicked(reason="x" * ((1 << 20) + 10)))
    must_reject(blob)
    assert m.decode(blob, max_size=len(blob)).reason.startswith("xxx")


def test_huge_collections_are_refused():
    V = m.PROTOCOL_VERSION
    must_reject(wire([V, "commence", {"tag": 1, "seq": 1, "revision": 1, "participants": [1] * ((1 << 16) + 1)}]),
                max_size=1 << 22)
    many = {f"k{i}": i for i in range((1 << 10) + 1)}
    must_reject(wire([V, "heartbeat", many]), max_size=1 << 22)

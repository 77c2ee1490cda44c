"""Config: defaults, ``PCCL_*`` environment overrides (from an explicit env dict), validation."""
from __future__ import annotations

import dataclasses

import pytest

from pccl.config import Config, resolve
from pccl.errors import InvalidUsage

FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "secret"}  # secret: test_auth.py
INT_FIELDS = sorted(n for n, f in FIELDS.items() if f.type in ("int", int))
FLOAT_FIELDS = sorted(n for n, f in FIELDS.items() if f.type in ("float", float))


def env_name(field: str) -> str:
    return "PCCL_" + field.upper()


def test_defaults():
    c = Config()
    assert c.heartbeat_interval == 0.5
    assert c.peer_timeout == 4.0
    assert c.master_timeout == 6.0
    assert c.join_timeout == 300.0
    assert c.topology_timeout == 120.0
    assert c.op_timeout == 120.0
    assert c.request_timeout == 10.0
    assert c.connect_timeout == 5.0
    assert c.max_control_message == 1 << 20
    assert c.max_frame_bytes == 1 << 30
    assert c.pipeline_bytes == 4 << 20
    assert c.max_half_open == 64
    assert c.max_in_flight == 16
    # every default is a positive number of the declared type, and the heartbeat is inside the timeout
    for name in INT_FIELDS:
        assert type(getattr(c, name)) is int and getattr(c, name) > 0
    for name in FLOAT_FIELDS:
        assert type(getattr(c, name)) is float and getattr(c, name) > 0
    assert c.heartbeat_interval < c.peer_timeout
    assert set(INT_FIELDS) | set(FLOAT_FIELDS) == set(FIELDS)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().peer_timeout = 1.0  # type: ignore[misc]


def test_empty_env_gives_defaults_and_ignores_os_environ(monkeypatch):
    monkeypatch.setenv("PCCL_PEER_TIMEOUT", "99")
    assert Config.from_env({}) == Config()


def test_none_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("PCCL_PEER_TIMEOUT", "99")
    monkeypatch.setenv("PCCL_MAX_IN_FLIGHT", "3")
    c = Config.from_env()
    assert c.peer_timeout == 99.0 and c.max_in_flight == 3
    assert resolve(None) == c


def test_resolve_keeps_an_explicit_config(monkeypatch):
    monkeypatch.setenv("PCCL_PEER_TIMEOUT", "99")
    c = Config(peer_timeout=7.0)
    assert resolve(c) is c


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_has_an_env_override(name):
    default = getattr(Config(), name)
    if name in INT_FIELDS:
        raw, want = str(default + 3), default + 3
    else:
        raw, want = repr(default * 2.5), default * 2.5
    env = {env_name(name): raw}
    if name == "heartbeat_interval":
        env["PCCL_PEER_TIMEOUT"] = "100"  # keep heartbeat < peer timeout
    c = Config.from_env(env)
    assert getattr(c, name) == want
    assert type(getattr(c, name)) is (int if name in INT_FIELDS else float)
    for other in FIELDS:  # nothing else moved
        if other != name and env_name(other) not in env:
            assert getattr(c, other) == getattr(Config(), other)


def test_float_fields_accept_integers_and_exponents():
    c = Config.from_env({"PCCL_PEER_TIMEOUT": "8", "PCCL_OP_TIMEOUT": "1e3", "PCCL_HEARTBEAT_INTERVAL": " 0.25 "})
    assert (c.peer_timeout, c.op_timeout, c.heartbeat_interval) == (8.0, 1000.0, 0.25)


def test_unrelated_variables_are_ignored():
    env = {"PCCL_MASTER": "127.0.0.1:1", "PCCL": "x", "PEER_TIMEOUT": "1", "pccl_peer_timeout": "1"}
    assert Config.from_env(env) == Config()


def test_overrides_beat_env():
    c = Config.from_env({"PCCL_PEER_TIMEOUT": "9", "PCCL_OP_TIMEOUT": "33"}, peer_timeout=11.0)
    assert c.peer_timeout == 11.0 and c.op_timeout == 33.0


@pytest.mark.parametrize("name,raw", [
    ("peer_timeout", "abc"), ("peer_timeout", ""), ("peer_timeout", "0"), ("peer_timeout", "-1"),
    ("op_timeout", "1,5"), ("max_in_flight", "2.5"), ("max_in_flight", "0"), ("max_in_flight", "-4"),
    ("pipeline_bytes", "4MiB"), ("max_half_open", "x"), ("heartbeat_interval", "-0.5"),
    ("peer_timeout", "0.4"),  # not above the default heartbeat interval
    ("heartbeat_interval", "4"),  # equal to the default peer timeout
])
def test_invalid_env_values_raise_invalid_usage(name, raw):
    with pytest.raises(InvalidUsage):
        Config.from_env({env_name(name): raw})


def test_bad_env_message_names_the_variable():
    with pytest.raises(InvalidUsage, match="PCCL_MAX_IN_FLIGHT"):
        Config.from_env({"PCCL_MAX_IN_FLIGHT": "many"})


@pytest.mark.parametrize("changes", [
    {"peer_timeout": 0}, {"peer_timeout": -1.0}, {"max_in_flight": 0}, {"op_timeout": "10"},
    {"op_timeout": None}, {"max_in_flight": True}, {"heartbeat_interval": 5.0},
    {"heartbeat_interval": 4.0}, {"pipeline_bytes": -1},
])
def test_invalid_direct_values_raise_invalid_usage(changes):
    with pytest.raises(InvalidUsage):
        Config(**changes)
    with pytest.raises(InvalidUsage):
        Config().replace(**changes)
    with pytest.raises(InvalidUsage):
        Config.from_env({}, **changes)


def test_replace_returns_a_new_valid_config():
    base = Config()
    c = base.replace(peer_timeout=2.0, heartbeat_interval=0.1)
    assert (c.peer_timeout, c.heartbeat_interval) == (2.0, 0.1)
    assert base == Config()


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["peer_timeout", "op_timeout", "connect_timeout"])
def test_non_finite_timeouts_are_refused(name, raw):
    """Regression: `v <= 0` is False for NaN, so NaN (and inf, "forever") used to pass."""
    with pytest.raises(InvalidUsage):
        Config.from_env({env_name(name): raw})
    with pytest.raises(InvalidUsage):
        Config(**{name: float(raw)})


@pytest.mark.parametrize("name", INT_FIELDS)
def test_int_fields_refuse_floats(name):
    """Regression: Config(max_control_message=1e6) used to pass and then made every decode fail."""
    with pytest.raises(InvalidUsage):
        Config(**{name: float(getattr(Config(), name))})
    with pytest.raises(InvalidUsage):
        Config(**{name: float(getattr(Config(), name)) + 0.5})


def test_master_restart_knobs():
    c = Config()
    assert (c.master_reconnect_timeout, c.master_reconnect_backoff, c.master_reconnect_backoff_max,
            c.master_regroup_timeout) == (60.0, 0.1, 2.0, 15.0)
    assert Config.from_env({"PCCL_MASTER_RECONNECT_TIMEOUT": "0"}).master_reconnect_timeout == 0.0  # ride-through off
    with pytest.raises(InvalidUsage):
        Config(master_reconnect_timeout=-1.0)
    with pytest.raises(InvalidUsage):
        Config(master_regroup_timeout=0.0)  # only the reconnect window may be 0
    with pytest.raises(InvalidUsage):
        Config(master_reconnect_backoff=3.0)  # above the cap

"""pccl.netem: command planning, addresses and per-flow filters (pure), then real namespaces when root."""
from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import subprocess
import sys

import pytest

from pccl import netem
from pccl.errors import PcclError

PREFIX, SUBNET = "pcclt", 254   # apart from a developer's default `pccl` hosts on 198.18.0.0/24


# ---- pure ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, bits", [("1gbit", 10**9), ("250mbit", 250 * 10**6), ("100kbit", 10**5),
                                        ("12.5mbps", 100 * 10**6), (" 2GBit ", 2 * 10**9), ("800bit", 800)])
def test_parse_rate(text, bits):
    assert netem.parse_rate(text) == bits


@pytest.mark.parametrize("text", ["", "fast", "0mbit", "-1gbit", "1gb", "1 gbit/s", "gbit"])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        netem.parse_rate(text)


@pytest.mark.parametrize("prefix", ["", "Pccl", "1pccl", "pccl-x", "toolongpx"])
def test_bad_prefixes_are_rejected(prefix):
    with pytest.raises(ValueError):
        netem.plan_up(1, prefix)


def test_interface_names_fit_ifnamsiz():
    longest = "abcdefgh"
    for name in (netem.bridge_name(longest), netem.veth_name(longest, netem.MAX_HOSTS), "eth0"):
        assert len(name) <= 15
    assert netem.namespace("pccl", 3) == "pccl-h3" and netem.bridge_name("pccl") == "pcclbr0"


def test_addresses_are_in_the_benchmarking_range_only():
    assert netem.host_address(0) == "198.18.0.1"
    assert netem.host_address(1) == "198.18.0.11" and netem.host_address(2, subnet=7) == "198.18.7.12"
    all_addrs = {netem.host_address(i, s) for s in (0, 255) for i in range(netem.MAX_HOSTS + 1)}
    assert len(all_addrs) == 2 * (netem.MAX_HOSTS + 1)
    assert all(ipaddress.IPv4Address(a) in netem.BENCH_NET for a in all_addrs)
    assert netem.host_address(netem.MAX_HOSTS) == "198.18.0.254"   # never the broadcast .255
    for bad in ({"i": netem.MAX_HOSTS + 1}, {"i": -1}, {"i": 1, "subnet": 256}, {"i": 1, "subnet": -1}):
        with pytest.raises(ValueError):
            netem.host_address(**bad)


def _ips(cmds):
    for cmd in cmds:
        for token in cmd:
            try:
                yield ipaddress.ip_interface(token).ip
            except ValueError:
                pass


@pytest.mark.parametrize("kw", [{}, {"rate": "1gbit"}, {"rate": "1gbit", "ingress": False},
                                {"per_flow_rate": "200mbit", "flows": 4}, {"subnet": 42}])
def test_plan_up_uses_only_ip_and_tc_and_benchmark_addresses(kw):
    cmds = netem.plan_up(3, **kw)
    assert {cmd[0] for cmd in cmds} <= {"ip", "tc"}
    ips = list(_ips(cmds))
    assert len(ips) == 4 and all(ip in netem.BENCH_NET for ip in ips)
    assert sum(cmd[:3] == ["ip", "netns", "add"] for cmd in cmds) == 3
    veths = [cmd for cmd in cmds if "veth" in cmd]
    assert len(veths) == 3 and all(cmd.count("65535") == 2 and cmd[-2:] == ["netns", f"pccl-h{i}"]
                                   for i, cmd in enumerate(veths, 1))
    assert cmds[-1] == ["ip", "link", "set", "pcclbr0", "mtu", "65535"]


def test_rate_shapes_both_ends_of_each_link_unless_egress_only():
    tbfs = [cmd for cmd in netem.plan_up(2, rate="1gbit") if "tbf" in cmd]
    assert [(cmd[:3], cmd[cmd.index("dev") + 1]) for cmd in tbfs] == [
        (["tc", "-n", "pccl-h1"], "eth0"), (["tc", "qdisc", "replace"], "pcclv1"),
        (["tc", "-n", "pccl-h2"], "eth0"), (["tc", "qdisc", "replace"], "pcclv2")]
    assert all(cmd[cmd.index("rate") + 1] == "1000000000bit" and int(cmd[cmd.index("burst") + 1]) >= 65536
               for cmd in tbfs)
    egress = [cmd for cmd in netem.plan_up(2, rate="1gbit", ingress=False) if "tbf" in cmd]
    assert len(egress) == 2 and all(cmd[2].startswith("pccl-h") for cmd in egress)


def test_plan_up_rejects_bad_arguments():
    for kw in ({"n": 0}, {"n": netem.MAX_HOSTS + 1}, {"n": 2, "rate": "1gbit", "per_flow_rate": "1mbit"},
               {"n": 2, "per_flow_rate": "1mbit", "flows": 6}, {"n": 2, "per_flow_rate": "1mbit", "flows": 512},
               {"n": 2, "rate": "quick"}):
        with pytest.raises(ValueError):
            netem.plan_up(**kw)


def _filters(flows):
    cmds = netem.per_flow_cmds("eth0", 200 * 10**6, flows, "pccl-h1")
    assert cmds[0][-3:] == ["htb", "default", "0"]
    classes = [cmd[cmd.index("classid") + 1] for cmd in cmds if "class" in cmd]
    filters = [cmd for cmd in cmds if "filter" in cmd]
    assert len(classes) == len(filters) == flows == len(set(classes))
    return [(int(f[f.index("sport") + 1]), int(f[f.index("sport") + 2], 16), f[-1]) for f in filters]


@pytest.mark.parametrize("flows", [1, 2, 8, 64])
def test_u32_filter_match_values_for_each_residue(flows):
    filters = _filters(flows)
    for r, (value, mask, flowid) in enumerate(filters):
        assert (value, mask, flowid) == (r << 1, (flows - 1) << 1, f"1:{r + 1:x}")
    for port in range(0, 65536, 7):   # every source port falls in exactly the class of its residue
        hits = [flowid for value, mask, flowid in filters if port & mask == value]
        assert hits == [f"1:{netem.flow_residue(port, flows) + 1:x}"]


def test_bound_source_ports_land_in_distinct_classes():
    base = 37 * 512   # measure binds base + 2c with base a multiple of 512
    assert [netem.flow_residue(base + 2 * c, 8) for c in range(8)] == list(range(8))
    assert len({netem.flow_residue(base + 2 * c, 256) for c in range(256)}) == 256


def test_parse_netns_and_links():
    text = "pccl-h10 (id: 3)\npccl-h2\nother\npccl-probe123 (id: 0)\npccl2-h1\npccl-hx\n"
    assert netem.parse_netns(text, "pccl") == ["pccl-h2", "pccl-h10", "pccl-probe123"]
    links = ("1: lo: <LOOPBACK,UP> mtu 65536\n6: pcclbr0: <BROADCAST> mtu 65535\n"
             "7: pcclv1@if2: <BROADCAST> mtu 65535\n8: pcclv2br0: <X>\n9: pcclvv1@if2: <X>\n4: eth0: <UP>\n")
    assert netem.parse_links(links, "pccl") == ["pcclbr0", "pcclv1"]


def test_window_rate_counts_only_the_window():
    slot = netem.BUCKET_S
    buckets = {int(100.0 / slot) + k: 1000 for k in range(-50, 250)}   # 1000 bytes per slot from t=99.5
    assert netem.window_rate(buckets, 100.0, 102.0) == pytest.approx(1000 / slot)
    assert netem.window_rate(buckets, 102.0, 103.0) == pytest.approx(500 / slot)


def test_hosts_argv_wraps_in_the_namespace():
    hosts = netem.Hosts("pccl", 2)
    assert hosts.argv(0, ["true"]) == ["true"]
    assert hosts.argv(2, ["true"]) == ["ip", "netns", "exec", "pccl-h2", "true"]
    assert hosts.names == ["pccl-h1", "pccl-h2"] and hosts.addresses == ["198.18.0.11", "198.18.0.12"]
    with pytest.raises(ValueError):
        hosts.argv(3, ["true"])


def test_not_root_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(netem.os, "geteuid", lambda: 1000)
    assert netem.available() == (False, "needs root (network namespaces need CAP_SYS_ADMIN)")
    assert netem.main(["up", "--hosts", "2"]) == 2
    assert "needs root" in capsys.readouterr().err


# ---- real namespaces (root only) ----------------------------------------------------------------------------

ECHO = """import socket, sys
srv = socket.create_server((sys.argv[1], 7000)); srv.settimeout(10); print("READY", flush=True)
c, _ = srv.accept(); c.settimeout(10); c.sendall(c.recv(100).upper())"""
CALL = """import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); s.sendall(b"ping")
print(s.recv(100).decode())"""


@pytest.fixture
def can_netem():
    ok, why = netem.available(PREFIX)
    if not ok:
        pytest.skip(f"cannot emulate hosts here: {why}")
    netem.down(PREFIX)
    yield
    netem.down(PREFIX)


def _call(hosts, host, addr, port):
    return subprocess.run(hosts.argv(host, [sys.executable, "-c", CALL, addr, str(port)]), check=False,
                          capture_output=True, text=True, timeout=20)


def test_two_hosts_talk_and_down_removes_everything(can_netem):
    netem.up(1, PREFIX, subnet=SUBNET)   # a leftover, as from a crashed run: up() must replace it
    with netem.up(2, PREFIX, rate="1gbit", subnet=SUBNET) as hosts:
        assert netem.discover(PREFIX) == hosts and hosts.address(2) == f"198.18.{SUBNET}.12"
        server = hosts.run(2, [sys.executable, "-c", ECHO, hosts.address(2)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "READY"
            r = _call(hosts, 1, hosts.address(2), 7000)
            assert (r.returncode, r.stdout.strip()) == (0, "PING"), r.stderr
        finally:
            server.kill()
            server.wait(10)
        with socket.create_server((hosts.address(0), 0)) as master:   # a master in the root namespace
            master.settimeout(10)
            with subprocess.Popen(hosts.argv(1, [sys.executable, "-c", CALL, hosts.address(0),
                                                 str(master.getsockname()[1])]), stdout=subprocess.PIPE) as p:
                conn, (peer, _) = master.accept()
                with conn:
                    conn.sendall(conn.recv(100) + b"!")
                assert peer == hosts.address(1) and p.communicate(timeout=10)[0].strip() == b"ping!"
        assert "tbf" in netem.status(PREFIX)
    assert netem._ours(PREFIX) == ([], []) and netem.discover(PREFIX) is None
    netem.down(PREFIX)   # idempotent


@pytest.mark.slow
def test_measure_per_flow_caps_each_flow(can_netem):
    with netem.up(2, PREFIX, per_flow_rate="80mbit", flows=8, subnet=SUBNET) as hosts:
        r = netem.measure(hosts, [1], 2, seconds=1.0, connections=4, warmup=0.3, port=5299)
        assert len(r["conns"]) == 4 and all(not c["error"] for c in r["conns"])
        assert len({netem.flow_residue(c["sport"], 8) for c in r["conns"]}) == 4
        assert all(0 < c["MBps"] <= 10 * 1.1 for c in r["conns"])   # 80 mbit = 10 MB/s per flow, never more


@pytest.mark.timeout(300)
def test_bench_wan_two_peers_per_host_runs_ring_and_hierarchical(can_netem, tmp_path):
    """bench-wan --per-host: 2 emulated hosts x 2 peers, locality per host, both algorithms run
    and are reported (the benchmark itself is in docs/benchmarks.md)."""
    from pccl import bench_wan

    out = tmp_path / "wan.json"
    assert bench_wan.main(["--peers", "4", "--per-host", "2", "--mib", "1", "--repeats", "1", "--rate", "1gbit",
                           "--quantization", "none", "--algorithms", "ring,hierarchical", "--timeout", "120",
                           "--prefix", PREFIX, "--subnet", str(SUBNET), "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["per_host"] == 2 and set(s["cells"]) == {"K=2 none ring", "K=2 none hierarchical"}
    assert s["cells"]["K=2 none ring"]["ran"] == ["ring"]
    assert s["cells"]["K=2 none hierarchical"]["ran"] == ["hierarchical"]
    assert all(len(c["seconds"]) == 1 and c["seconds"][0] > 0 for c in s["cells"].values())
    assert netem._ours(PREFIX) == ([], [])  # the hosts are gone again


def test_bench_wan_refuses_a_per_host_count_that_does_not_divide_the_peers():
    from pccl import bench_wan

    with pytest.raises(PcclError, match="must divide"):
        bench_wan.run(argparse.Namespace(peers=3, per_host=2))

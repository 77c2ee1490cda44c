"""Emulated test hosts: Linux network namespaces on one bridge, with optional ``tc`` rate limits.

How it works:
1. A bridge ``{prefix}br0`` in the root namespace holds 198.18.S.1/24 (S = ``subnet``; only the RFC 2544
   benchmarking range 198.18.0.0/15 is ever used). "Host 0" is the root namespace: run a master there.
2. Host i (1..n) is namespace ``{prefix}-h{i}``; its ``eth0`` holds 198.18.S.(10+i)/24 and is one end of a veth
   pair whose root end ``{prefix}v{i}`` is a bridge port. MTU 65535 on both ends matches loopback speed.
3. ``rate`` puts a ``tbf`` on eth0 (what the host sends) and, unless ``ingress=False``, on ``{prefix}v{i}``
   (what the bridge sends into the host), so each host's link is capped both ways like a full-duplex NIC:
   three senders into one host then share its one link.
4. ``per_flow_rate`` instead puts an ``htb`` on eth0 with one class per TCP source-port residue
   ``(sport >> 1) & (flows-1)``, picked by ``u32`` filters: each flow the host sends is capped on its own, like
   a long-fat WAN path. Bit 0 is skipped because Linux gives connect() only even ephemeral ports. Flows whose
   ports share a residue share (unfairly) one class; kernel-chosen ports collide by chance, and data sent back
   on accepted connections all carries the listening port. Flows sent from the root namespace are not capped.
Commands are planned by pure functions and run by a thin shell, each with a timeout. This kernel has no netem
qdisc (no delay) and neither iptables nor nft is installed, so there is no loss emulation here.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from pccl.errors import PcclError

CMD_TIMEOUT = 10.0          # seconds for any one ip/tc command
MTU = 65535
MAX_HOSTS = 244             # .11 .. .254
BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")   # RFC 2544; no other range is ever used
BUCKET_S = 0.01             # resolution of the receiver's bytes-over-time histogram
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


class NetemError(PcclError):
    """An ip/tc command failed or timed out, a helper did not answer, or the machine cannot emulate hosts."""


# ---- pure planning -------------------------------------------------------------------------------------------

def parse_rate(rate: str) -> int:
    """``"1gbit"``, ``"250mbit"``, ``"12.5mbps"`` (bytes/s, as tc reads it) -> bits/s. Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", rate.lower())
    if not m or m[2] not in _UNITS or float(m[1]) <= 0:
        raise ValueError(f"bad rate {rate!r}: use e.g. 1gbit, 250mbit, 100kbit, 12mbps")
    return int(float(m[1]) * _UNITS[m[2]])


def check_prefix(prefix: str) -> str:
    """1-8 of [a-z0-9], starting with a letter, so every interface name fits IFNAMSIZ. Raises ValueError."""
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        raise ValueError(f"bad prefix {prefix!r}: 1-8 lowercase letters/digits, starting with a letter")
    return prefix


def bridge_name(prefix: str) -> str:
    return f"{check_prefix(prefix)}br0"


def namespace(prefix: str, i: int) -> str:
    return f"{check_prefix(prefix)}-h{i}"


def veth_name(prefix: str, i: int) -> str:
    return f"{check_prefix(prefix)}v{i}"


def host_address(i: int, subnet: int = 0) -> str:
    """Host 0 is the bridge (root namespace) at 198.18.S.1, host i >= 1 is 198.18.S.(10+i)."""
    if not 0 <= subnet <= 255:
        raise ValueError(f"subnet {subnet} not in 0..255 (third octet of 198.18.S.0/24)")
    if not 0 <= i <= MAX_HOSTS:
        raise ValueError(f"host {i} not in 0..{MAX_HOSTS}")
    return f"198.18.{subnet}.{10 + i if i else 1}"


def _tc(ns: str | None) -> list[str]:
    return ["tc", "-n", ns] if ns else ["tc"]


def _burst(bits: int) -> str:
    # A bucket must hold a whole 64 KiB GSO packet; ~2 ms of the rate keeps fast links from stalling on it.
    return str(max(256 * 1024, bits // 8 // 500))


def tbf_cmd(dev: str, bits: int, ns: str | None = None) -> list[str]:
    return [*_tc(ns), "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{bits}bit", "burst", _burst(bits),
            "latency", "20ms"]


def flow_residue(port: int, flows: int) -> int:
    """The per-flow class index of a TCP source port (bit 0 skipped: connect() ports are even)."""
    return (port >> 1) & (flows - 1)


def per_flow_cmds(dev: str, bits: int, flows: int, ns: str | None = None) -> list[list[str]]:
    """An htb root (unmatched traffic such as ARP goes unshaped), and a class and a u32 filter per residue."""
    if not 1 <= flows <= 256 or flows & (flows - 1):
        raise ValueError(f"flows must be a power of two in 1..256, not {flows}")
    tc, rate, burst = _tc(ns), f"{bits}bit", _burst(bits)
    cmds = [[*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "0"]]
    for r in range(flows):
        cls = f"1:{r + 1:x}"
        cmds.append([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", cls, "htb", "rate", rate,
                     "ceil", rate, "burst", burst, "cburst", burst, "quantum", "65536"])
        # u32 "ip sport" reads 16 bits at IP offset 20 (no IP options, which Linux TCP does not send).
        cmds.append([*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                     "match", "ip", "protocol", "6", "0xff", "match", "ip", "sport", str(r << 1),
                     hex((flows - 1) << 1), "flowid", cls])
    return cmds


def plan_up(n: int, prefix: str = "pccl", *, subnet: int = 0, rate: str | None = None,
            per_flow_rate: str | None = None, flows: int = 8, ingress: bool = True) -> list[list[str]]:
    """Every command ``up`` runs, in order. Raises ValueError on bad arguments."""
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"hosts must be in 1..{MAX_HOSTS}, not {n}")
    if rate and per_flow_rate:
        raise ValueError("rate and per_flow_rate are exclusive")
    br, mtu = bridge_name(prefix), str(MTU)
    cmds = [["ip", "link", "add", br, "type", "bridge"], ["ip", "link", "set", br, "mtu", mtu],
            ["ip", "addr", "add", f"{host_address(0, subnet)}/24", "dev", br], ["ip", "link", "set", br, "up"]]
    for i in range(1, n + 1):
        ns, v = namespace(prefix, i), veth_name(prefix, i)
        cmds += [["ip", "netns", "add", ns],
                 ["ip", "link", "add", v, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu,
                  "netns", ns],
                 ["ip", "link", "set", v, "master", br], ["ip", "link", "set", v, "up"],
                 ["ip", "-n", ns, "addr", "add", f"{host_address(i, subnet)}/24", "dev", "eth0"],
                 ["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", ns, "link", "set", "eth0", "up"]]
        if rate:
            cmds += [tbf_cmd("eth0", parse_rate(rate), ns)] + ([tbf_cmd(v, parse_rate(rate))] if ingress else [])
        elif per_flow_rate:
            cmds += per_flow_cmds("eth0", parse_rate(per_flow_rate), flows, ns)
    return cmds + [["ip", "link", "set", br, "mtu", mtu]]   # a bridge takes its ports' minimum MTU


def parse_netns(text: str, prefix: str) -> list[str]:
    """Our namespaces in ``ip netns list`` output: hosts by index, then leftover probes of ``available``."""
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    hosts = sorted((int(m[1]), name) for name in names if (m := re.fullmatch(rf"{prefix}-h(\d+)", name)))
    return [name for _, name in hosts] + sorted(n for n in names if re.fullmatch(rf"{prefix}-probe\d+", n))


def parse_links(text: str, prefix: str) -> list[str]:
    """Our root-namespace links (bridge, veth ends) in ``ip -o link show`` output."""
    found = (re.match(r"\d+:\s+([^:@\s]+)", line) for line in text.splitlines())
    return [m[1] for m in found if m and re.fullmatch(rf"{prefix}(br0|v\d+)", m[1])]


def window_rate(buckets: dict[int, int], t0: float, t1: float) -> float:
    """Bytes/s in [t0, t1) from a histogram of bytes per BUCKET_S slot (keyed by int(t / BUCKET_S))."""
    lo, hi = round(t0 / BUCKET_S), round(t1 / BUCKET_S)
    return sum(b for k, b in buckets.items() if lo <= k < hi) / ((hi - lo) * BUCKET_S)


# ---- shell ---------------------------------------------------------------------------------------------------

def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except FileNotFoundError as exc:
        raise NetemError(f"{cmd[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetemError(f"`{' '.join(cmd)}` did not finish in {CMD_TIMEOUT} s") from exc
    if check and p.returncode:
        raise NetemError(f"`{' '.join(cmd)}` failed: {p.stderr.strip() or p.returncode}")
    return p


def _ours(prefix: str) -> tuple[list[str], list[str]]:
    return (parse_netns(_run(["ip", "netns", "list"]).stdout, prefix),
            parse_links(_run(["ip", "-o", "link", "show"]).stdout, prefix))


def available(prefix: str = "pccl") -> tuple[bool, str]:
    """Whether this machine can build hosts (root; ip and tc present; a namespace with a veth creatable)."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces need CAP_SYS_ADMIN)"
    if missing := [tool for tool in ("ip", "tc") if not shutil.which(tool)]:
        return False, f"{' and '.join(missing)} (iproute2) not installed"
    probe = f"{check_prefix(prefix)}-probe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
    except NetemError as exc:
        return False, f"cannot create a network namespace with a veth: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return True, "ok"


@dataclass(frozen=True)
class Hosts:
    """Hosts 1..count live in namespaces; host 0 is the root namespace at the bridge address."""

    prefix: str
    count: int
    subnet: int = 0

    @property
    def names(self) -> list[str]:
        return [namespace(self.prefix, i) for i in range(1, self.count + 1)]

    @property
    def addresses(self) -> list[str]:
        return [host_address(i, self.subnet) for i in range(1, self.count + 1)]

    def address(self, host: int) -> str:
        """Address of host 0..count. Raises ValueError for other numbers."""
        if not 0 <= host <= self.count:
            raise ValueError(f"host {host} not in 0..{self.count}")
        return host_address(host, self.subnet)

    def argv(self, host: int, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside the host's namespace (host 0: unchanged)."""
        self.address(host)
        return ["ip", "netns", "exec", namespace(self.prefix, host), *argv] if host else list(argv)

    def run(self, host: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv in the host's namespace. The caller owns the process (wait with a timeout; kill)."""
        return subprocess.Popen(self.argv(host, argv), **popen_kwargs)

    def down(self) -> None:
        down(self.prefix)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def up(n: int, prefix: str = "pccl", rate: str | None = None, per_flow_rate: str | None = None, flows: int = 8,
       *, subnet: int = 0, ingress: bool = True) -> Hosts:
    """Build n hosts, first removing leftovers of this prefix. Raises ValueError on bad arguments, NetemError
    when a command fails (everything is removed again) or another interface already uses the subnet."""
    cmds = plan_up(n, prefix, subnet=subnet, rate=rate, per_flow_rate=per_flow_rate, flows=flows, ingress=ingress)
    down(prefix)
    net = ipaddress.IPv4Network(f"{host_address(0, subnet)}/24", strict=False)
    if used := [ln.split()[1] for ln in _run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines()
                if net.overlaps(ipaddress.ip_interface(ln.split()[3]).network)]:
        raise NetemError(f"{net} is already used by {', '.join(used)}: pick another subnet")
    try:
        for cmd in cmds:
            _run(cmd)
    except BaseException:
        down(prefix)
        raise
    return Hosts(prefix, n, subnet)


def down(prefix: str = "pccl", timeout: float = 10.0) -> None:
    """Remove every namespace and link of this prefix, also leftovers of a crashed run; processes still in
    those namespaces are killed. Idempotent. Raises NetemError if something is still there after timeout."""
    namespaces, _ = _ours(check_prefix(prefix))
    for ns in namespaces:
        for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _run(["ip", "netns", "del", ns], check=False)
    deadline = time.monotonic() + timeout
    while any(left := _ours(prefix)):
        if time.monotonic() > deadline:
            raise NetemError(f"could not remove {', '.join(left[0] + left[1])}")
        for name in left[1]:   # veth root ends vanish with their namespace, asynchronously
            _run(["ip", "link", "del", name], check=False)
        time.sleep(0.05)


def discover(prefix: str = "pccl") -> Hosts | None:
    """The hosts of this prefix that exist now (as ``up`` left them), or None."""
    m = re.search(r"inet 198\.18\.(\d+)\.1/", _run(["ip", "-o", "-4", "addr", "show", "dev", bridge_name(prefix)],
                                                   check=False).stdout)
    count = sum(1 for name in _ours(prefix)[0] if "-h" in name)
    return Hosts(prefix, count, int(m[1])) if m and count else None


def status(prefix: str = "pccl") -> str:
    """What exists for this prefix, with addresses and root qdiscs, one line each."""
    namespaces, links = _ours(prefix)
    out = [f"links: {' '.join(links) or '-'}"]
    for ns in namespaces:
        shown = _run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"], check=False).stdout
        addr = re.findall(r"inet (\S+)", shown)
        qd = _run(["tc", "-n", ns, "qdisc", "show", "dev", "eth0"], check=False).stdout.splitlines()
        out.append(f"{ns}: {' '.join(addr) or '-'}  eth0 qdisc: {qd[0] if qd else '-'}")
    for link in links:
        qd = _run(["tc", "qdisc", "show", "dev", link], check=False).stdout.splitlines()
        out.append(f"{link} qdisc: {qd[0] if qd else '-'}")
    return "\n".join(out)


# ---- bulk-throughput check (plain sockets; the helpers run inside the namespaces) -----------------------------

def _recv_main(addr: str, port: int, expect: int, limit: float) -> dict[str, Any]:
    deadline = time.time() + limit
    srv = socket.create_server((addr, port))
    srv.settimeout(0.2)
    print("READY", flush=True)
    conns: list[dict[str, Any]] = []
    threads: list[threading.Thread] = []

    def pump(conn: socket.socket, rec: dict[str, Any]) -> None:
        buf, hist = bytearray(1 << 20), rec["buckets"]
        try:
            conn.settimeout(max(0.1, deadline - time.time()))
            while k := conn.recv_into(buf):
                slot = int(time.time() / BUCKET_S)
                hist[slot] = hist.get(slot, 0) + k
        except OSError as exc:
            rec["error"] = str(exc)
        finally:
            conn.close()

    while len(conns) < expect and time.time() < deadline:
        try:
            conn, peer = srv.accept()
        except TimeoutError:
            continue
        conns.append({"peer": list(peer), "buckets": {}})
        threads.append(threading.Thread(target=pump, args=(conn, conns[-1]), daemon=True))
        threads[-1].start()
    srv.close()
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    return {"conns": conns}


def _send_main(addr: str, port: int, connections: int, seconds: float, src_base: int, limit: float) -> None:
    socks = []
    for c in range(connections):
        for attempt in range(8):   # a port of an earlier run may still be in TIME_WAIT towards this receiver
            s = socket.socket()
            s.settimeout(limit)
            try:
                if src_base:   # flow c gets residue c (mod flows <= 256) under flow_residue
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("", src_base + 2 * c + 1024 * attempt))
                s.connect((addr, port))
                break
            except OSError:
                s.close()
                if attempt == 7 or not src_base:
                    raise
        socks.append(s)
    print("READY", flush=True)
    start_at = float(sys.stdin.readline())

    def pump(s: socket.socket) -> None:
        data = memoryview(bytearray(1 << 20))
        time.sleep(max(0.0, start_at - time.time()))
        with s:
            while time.time() < start_at + seconds:
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=pump, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)


def measure(hosts: Hosts, senders: Sequence[int], receiver: int, *, seconds: float = 2.0, connections: int = 1,
            port: int = 5201, bind_ports: bool = True, warmup: float = 0.5) -> dict[str, Any]:
    """Each sender host opens ``connections`` TCP flows to the receiver host and sends for warmup + seconds;
    the receiver counts what arrives in the last ``seconds``. With bind_ports flow c binds source port
    base + 2c (base: a random multiple of 512 below the ephemeral range), so flows get distinct per-flow
    classes. Returns {"MBps": total, "conns": [{"from", "sport", "MBps"}]} (MB = 1e6 bytes).
    Raises NetemError when a helper fails or does not answer within seconds + 20 s."""
    limit = warmup + seconds + 20.0
    procs: list[subprocess.Popen[str]] = []
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()

    def start(host: int, **spec: Any) -> None:
        p = hosts.run(host, [sys.executable, "-m", "pccl.netem", "_helper", json.dumps(spec)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        idx = len(procs)
        procs.append(p)

        def read() -> None:
            for ln in p.stdout or ():
                lines.put((idx, ln.strip()))
            lines.put((idx, None))
        threading.Thread(target=read, daemon=True).start()

    def first_lines(idxs: range) -> dict[int, str]:
        got: dict[int, str] = {}
        end = time.monotonic() + limit
        while len(got) < len(idxs):
            try:
                idx, ln = lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise NetemError(f"measure helpers did not answer within {limit:.0f} s") from None
            if idx in idxs and idx not in got:
                if ln is None:
                    raise NetemError(f"measure helper on host {([receiver] + list(senders))[idx]} failed")
                got[idx] = ln
        return got

    try:
        dest = hosts.address(receiver)
        start(receiver, role="recv", addr=dest, port=port, expect=len(senders) * connections, limit=limit)
        first_lines(range(1))
        base = random.randrange(20, 50) * 512 if bind_ports else 0
        for h in senders:
            start(h, role="send", addr=dest, port=port, connections=connections, seconds=warmup + seconds,
                  src_base=base, limit=limit)
        first_lines(range(1, len(procs)))
        start_at = time.time() + 0.1
        for p in procs[1:]:
            assert p.stdin is not None   # set by start()
            p.stdin.write(f"{start_at}\n")
            p.stdin.flush()
        result = json.loads(first_lines(range(1))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
    by_addr = {hosts.address(h): h for h in senders}
    t0, t1 = start_at + warmup, start_at + warmup + seconds
    conns = [{"from": by_addr.get(c["peer"][0], c["peer"][0]), "sport": c["peer"][1], "error": c.get("error", ""),
              "MBps": window_rate({int(k): v for k, v in c["buckets"].items()}, t0, t1) / 1e6}
             for c in result["conns"]]
    if len(conns) < len(senders) * connections:
        raise NetemError(f"only {len(conns)} of {len(senders) * connections} flows reached host {receiver}")
    conns.sort(key=lambda c: (str(c["from"]), c["sport"]))
    return {"MBps": sum(c["MBps"] for c in conns), "conns": conns}


# ---- command line ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pccl.netem", description="Emulated test hosts (netns + tc).")
    sub = p.add_subparsers(dest="cmd", required=True)
    pu = sub.add_parser("up", help="build hosts (removes leftovers of the prefix first)")
    pu.add_argument("--hosts", type=int, required=True)
    shape = pu.add_mutually_exclusive_group()
    shape.add_argument("--rate", help="tbf cap on each host link, e.g. 1gbit")
    shape.add_argument("--per-flow-rate", help="htb cap on each TCP flow a host sends, e.g. 200mbit")
    pu.add_argument("--flows", type=int, default=8, help="per-flow classes, a power of two (default 8)")
    pu.add_argument("--egress-only", action="store_true", help="with --rate: leave traffic into hosts uncapped")
    pu.add_argument("--subnet", type=int, default=0, help="use 198.18.SUBNET.0/24 (default 0)")
    sub.add_parser("down", help="remove everything of the prefix (idempotent)")
    sub.add_parser("status", help="list what exists")
    pm = sub.add_parser("measure", help="bounded TCP bulk-throughput check (host 0 = root namespace)")
    pm.add_argument("--from", dest="src", default="1", help="sender host(s), comma-separated (default 1)")
    pm.add_argument("--to", type=int, default=2, help="receiver host (default 2)")
    pm.add_argument("--seconds", type=float, default=2.0)
    pm.add_argument("--connections", "-k", type=int, default=1, help="parallel flows per sender")
    pm.add_argument("--port", type=int, default=5201)
    pm.add_argument("--no-bind", action="store_true", help="let the kernel pick source ports")
    for sp in sub.choices.values():
        sp.add_argument("--prefix", default="pccl")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_helper"]:   # started by measure() inside a namespace; not part of the CLI
        spec = json.loads(argv[1])
        if spec.pop("role") == "recv":
            print(json.dumps(_recv_main(**spec)), flush=True)
        else:
            _send_main(**spec)
        return 0
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("error: pccl.netem needs root (network namespaces need CAP_SYS_ADMIN); run it with sudo",
              file=sys.stderr)
        return 2
    try:
        if a.cmd == "up":
            h = up(a.hosts, a.prefix, a.rate, a.per_flow_rate, a.flows, subnet=a.subnet, ingress=not a.egress_only)
            print(f"host 0 (root namespace, {bridge_name(a.prefix)}): {h.address(0)}")
            for i, (name, addr) in enumerate(zip(h.names, h.addresses), 1):
                print(f"host {i} ({name}): {addr}")
        elif a.cmd == "down":
            down(a.prefix)
        elif a.cmd == "status":
            print(status(a.prefix))
        elif (hosts := discover(a.prefix)) is None:
            print(f"error: no hosts with prefix {a.prefix!r}; run `up` first", file=sys.stderr)
            return 1
        else:
            r = measure(hosts, [int(s) for s in a.src.split(",")], a.to, seconds=a.seconds,
                        connections=a.connections, port=a.port, bind_ports=not a.no_bind)
            for c in r["conns"]:
                print(f"host {c['from']} sport {c['sport']}: {c['MBps']:8.1f} MB/s {c['error']}")
            print(f"total {a.src} -> {a.to}: {r['MBps']:.1f} MB/s ({r['MBps'] / 1000:.3f} GB/s) "
                  f"over {a.seconds} s")
    except (NetemError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

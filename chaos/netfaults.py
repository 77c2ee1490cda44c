"""Link faults on emulated hosts (``pccl.netem`` namespaces): rate limits, random drops, link cuts.

How it works
1. Each peer slot runs in its own namespace (host i of ``pccl.netem``), whose ``eth0`` is one end
   of a veth pair bridged to the root namespace, where the masters listen.
2. ``apply_cmds`` / ``restore_cmds`` are pure: the commands that start and end one fault.
   ``slow``: a ``tbf`` on eth0 and on the root veth end (both directions); ``lossy``: iptables
   ``statistic --mode random`` DROP rules on INPUT and OUTPUT inside the namespace (probability
   ``param``) where iptables is installed; elsewhere (``backend="taildrop"``; this kernel has no
   netem, gact, red or sfq either) a ``tbf`` with a shallow queue (``LOSSY_TAILDROP``: 50 Mbit,
   100 kB) on both ends, which drops real packets whenever TCP's bursts overflow it (0.4–1 % of
   the packets of one bulk flow here; a quarter of the all-reduce peers' GSO packets in a
   campaign). That loss rate is not chosen by ``param``; the campaign reads the drops from
   ``tc -s`` (``parse_drops``) and records them with the fault.
   ``partition``: eth0 down, then up.
3. ``problem()`` says, before a campaign starts, why a scenario cannot run on this machine (not
   root, iproute2 missing), so it fails with that message instead of crashing midway.
"""
from __future__ import annotations

import re
import shutil

from pccl import netem


# rate (bit/s), bucket and queue (bytes) of the tail-drop lossy link; the queue must hold a 64 KiB
# GSO packet (a smaller one drops every large segment and stalls the flow instead of thinning it)
LOSSY_TAILDROP = (50_000_000, 262_144, 100_000)


def _drop_rule(chain: str, p: float) -> list[str]:
    return [chain, "-m", "statistic", "--mode", "random", "--probability", f"{p:.4f}", "-j", "DROP"]


def lossy_backend() -> str:
    """``iptables`` (random drops with the scheduled probability) where installed, else ``taildrop``."""
    return "iptables" if shutil.which("iptables") else "taildrop"


def _taildrop_cmd(dev: str, ns: str | None) -> list[str]:
    bits, burst, limit = LOSSY_TAILDROP
    return [*netem._tc(ns), "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{bits}bit", "burst", str(burst),
            "limit", str(limit)]


def _qdisc_del(ns: str, veth: str) -> list[list[str]]:
    return [["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], ["tc", "qdisc", "del", "dev", veth, "root"]]


def apply_cmds(kind: str, prefix: str, host: int, param: float, backend: str = "iptables") -> list[list[str]]:
    ns, veth = netem.namespace(prefix, host), netem.veth_name(prefix, host)
    if kind == "slow":
        bits = int(param)
        return [netem.tbf_cmd("eth0", bits, ns), netem.tbf_cmd(veth, bits)]
    if kind == "lossy" and backend == "taildrop":
        return [_taildrop_cmd("eth0", ns), _taildrop_cmd(veth, None)]
    if kind == "lossy":
        return [["ip", "netns", "exec", ns, "iptables", "-A", *_drop_rule(c, param)] for c in ("INPUT", "OUTPUT")]
    if kind == "partition":
        return [["ip", "-n", ns, "link", "set", "eth0", "down"]]
    raise ValueError(f"not a link fault: {kind!r}")


def restore_cmds(kind: str, prefix: str, host: int, param: float, backend: str = "iptables") -> list[list[str]]:
    ns, veth = netem.namespace(prefix, host), netem.veth_name(prefix, host)
    if kind == "slow" or (kind == "lossy" and backend == "taildrop"):
        return _qdisc_del(ns, veth)
    if kind == "lossy":
        return [["ip", "netns", "exec", ns, "iptables", "-D", *_drop_rule(c, param)] for c in ("INPUT", "OUTPUT")]
    if kind == "partition":
        return [["ip", "-n", ns, "link", "set", "eth0", "up"]]
    raise ValueError(f"not a link fault: {kind!r}")


def stats_cmds(prefix: str, host: int) -> list[list[str]]:
    """``tc -s`` of both qdiscs a tail-drop lossy link installs (read before they are removed)."""
    ns, veth = netem.namespace(prefix, host), netem.veth_name(prefix, host)
    return [["tc", "-s", "-n", ns, "qdisc", "show", "dev", "eth0"], ["tc", "-s", "qdisc", "show", "dev", veth]]


_SENT = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+),")


def parse_drops(text: str) -> tuple[int, int]:
    """(packets sent, packets dropped) summed over the qdiscs in ``tc -s qdisc show`` output."""
    sent = dropped = 0
    for m in _SENT.finditer(text):
        sent += int(m.group(2))
        dropped += int(m.group(3))
    return sent, dropped


def problem(kinds: set[str], prefix: str = "chaos") -> str | None:
    """Why these fault kinds cannot run here (None: they can)."""
    ok, why = netem.available(prefix)
    if not ok:
        return f"network namespaces are not available: {why}"
    return None


def run(cmds: list[list[str]], check: bool = True) -> None:
    """Run commands with pccl.netem's bounded shell. Raises netem.NetemError."""
    for cmd in cmds:
        netem._run(cmd, check=check)


def output(cmds: list[list[str]]) -> str:
    """The standard output of commands (failures give empty output: for statistics only)."""
    return "".join(netem._run(cmd, check=False).stdout for cmd in cmds)

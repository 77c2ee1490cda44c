"""Link faults on emulated hosts (``pccl.netem`` namespaces): rate limits, random drops, link cuts.

How it works
1. Each peer slot runs in its own namespace (host i of ``pccl.netem``), whose ``eth0`` is one end
   of a veth pair bridged to the root namespace, where the masters listen.
2. ``apply_cmds`` / ``restore_cmds`` are pure: the commands that start and end one fault.
   ``slow``: a ``tbf`` on eth0 and on the root veth end (both directions); ``lossy``: iptables
   ``statistic --mode random`` DROP rules on INPUT and OUTPUT inside the namespace (the kernel
   here has no netem qdisc, so there is no ``tc ... loss``); ``partition``: eth0 down, then up.
3. ``problem()`` says, before a campaign starts, why a scenario cannot run on this machine (not
   root, iproute2 or iptables missing), so it fails with that message instead of crashing midway.
"""
from __future__ import annotations

import shutil

from pccl import netem


def _drop_rule(chain: str, p: float) -> list[str]:
    return [chain, "-m", "statistic", "--mode", "random", "--probability", f"{p:.4f}", "-j", "DROP"]


def apply_cmds(kind: str, prefix: str, host: int, param: float) -> list[list[str]]:
    ns, veth = netem.namespace(prefix, host), netem.veth_name(prefix, host)
    if kind == "slow":
        bits = int(param)
        return [netem.tbf_cmd("eth0", bits, ns), netem.tbf_cmd(veth, bits)]
    if kind == "lossy":
        return [["ip", "netns", "exec", ns, "iptables", "-A", *_drop_rule(c, param)] for c in ("INPUT", "OUTPUT")]
    if kind == "partition":
        return [["ip", "-n", ns, "link", "set", "eth0", "down"]]
    raise ValueError(f"not a link fault: {kind!r}")


def restore_cmds(kind: str, prefix: str, host: int, param: float) -> list[list[str]]:
    ns, veth = netem.namespace(prefix, host), netem.veth_name(prefix, host)
    if kind == "slow":
        return [["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], ["tc", "qdisc", "del", "dev", veth, "root"]]
    if kind == "lossy":
        return [["ip", "netns", "exec", ns, "iptables", "-D", *_drop_rule(c, param)] for c in ("INPUT", "OUTPUT")]
    if kind == "partition":
        return [["ip", "-n", ns, "link", "set", "eth0", "up"]]
    raise ValueError(f"not a link fault: {kind!r}")


def problem(kinds: set[str], prefix: str = "chaos") -> str | None:
    """Why these fault kinds cannot run here (None: they can)."""
    ok, why = netem.available(prefix)
    if not ok:
        return f"network namespaces are not available: {why}"
    if "lossy" in kinds and not shutil.which("iptables"):
        return ("lossy-link needs iptables (`iptables -m statistic --mode random`), which is not installed "
                "on this machine, and this kernel has no netem qdisc for `tc ... loss`")
    return None


def run(cmds: list[list[str]], check: bool = True) -> None:
    """Run commands with pccl.netem's bounded shell. Raises netem.NetemError."""
    for cmd in cmds:
        netem._run(cmd, check=check)

"""The chaos campaign runner: the schedule is a pure function of the seed, the invariant checker
catches planted mismatches and hangs, and real campaigns (a 60-second mix in the default suite, a
10-minute SIGKILL soak marked slow) end with no mismatch and no hang."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos import invariants, report, schedule
from chaos.campaign import Campaign, Options

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("scenario", sorted(schedule.SCENARIOS))
def test_schedule_is_a_pure_function_of_the_seed(scenario):
    a = schedule.plan(scenario, 7, 120, 6)
    assert a == schedule.plan(scenario, 7, 120, 6)
    assert all(0 < f.at < 120 for f in a)
    assert [f.at for f in a] == sorted(f.at for f in a)
    if scenario != "none":
        assert a and a != schedule.plan(scenario, 8, 120, 6)


def test_schedule_is_the_same_in_a_fresh_interpreter():
    code = ("import json; from chaos import schedule; "
            "print(json.dumps([f.to_json() for f in schedule.plan('mix', 3, 90, 5, netns=True)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    here = [f.to_json() for f in schedule.plan("mix", 3, 90, 5, netns=True)]
    assert json.loads(out.stdout) == here


def test_schedule_shapes():
    k = schedule.Knobs()
    kills = schedule.plan("kill-loop", 1, 120, 6)
    assert [f.at for f in kills] == [10.0 * i for i in range(1, 12)] and {f.kind for f in kills} == {"kill"}
    for f in schedule.plan("stop-loop", 2, 200, 4):
        assert f.kind == "stop" and k.peer_timeout < f.duration <= k.peer_timeout + k.stop_max_extra
    for f in schedule.plan("join-storm", 2, 200, 4):
        assert f.kind == "join" and f.count == 4 and f.duration < k.join_every
    mix = schedule.plan("mix", 5, 2000, 4)
    assert {f.kind for f in mix} == {"kill", "stop", "join"}
    assert {f.kind for f in schedule.plan("mix", 5, 2000, 4, netns=True, with_master_restart=True)} == \
        {"kill", "stop", "join", "slow", "lossy", "partition", "master"}
    with pytest.raises(ValueError):
        schedule.plan("nope", 1, 10, 2)


# ---------------------------------------------------------------------------------------- invariants
def _op(peer, key, digest="aa", exact=True, seconds=0.1, deadline=24.0, cell=0):
    return {"ev": "op", "peer": peer, "key": key, "digest": digest, "exact": exact, "seconds": seconds,
            "deadline": deadline, "cell": cell, "t": 1.0}


def test_checker_passes_a_clean_run():
    evs = [_op(1, [1, 2, 0]), _op(2, [1, 2, 0]), _op(1, [1, 2, 1], "bb"), _op(2, [1, 2, 1], "bb"),
           {"ev": "sync", "peer": 1, "key": [1, 5], "hash": "h", "rx": 0, "fresh": False},
           {"ev": "sync", "peer": 3, "key": [1, 5], "hash": "h", "rx": 999, "fresh": True},
           {"ev": "lost", "peer": 4, "error": "Kicked"}]
    s = invariants.check(evs)
    assert (s["mismatches"], s["hangs"], s["unclear_errors"]) == (0, 0, 0)
    assert s["allreduces_completed"] == 2 and s["syncs_completed"] == 1 and s["lost"] == {"Kicked": 1}


def test_checker_detects_planted_mismatches():
    # different digests for one collective
    s = invariants.check([_op(1, [1, 2, 0], "aa"), _op(2, [1, 2, 0], "ab")])
    assert s["mismatches"] == 1 and "differs" in s["mismatch_examples"][0]
    # the same digest in two cells is not compared
    assert invariants.check([_op(1, [1, 2, 0], "aa", cell=0), _op(2, [1, 2, 0], "ab", cell=1)])["mismatches"] == 0
    # an inexact result
    s = invariants.check([_op(1, [1, 2, 0], exact=False), _op(2, [1, 2, 0])])
    assert s["mismatches"] == 1 and "inexact" in s["mismatch_examples"][0]
    # shared-state hashes that differ, and a veteran that had to download (drift)
    s = invariants.check([{"ev": "sync", "peer": 1, "key": [1, 5], "hash": "h1", "rx": 0, "fresh": False},
                          {"ev": "sync", "peer": 2, "key": [1, 5], "hash": "h2", "rx": 0, "fresh": False},
                          {"ev": "sync", "peer": 3, "key": [1, 6], "hash": "h", "rx": 64, "fresh": False}])
    assert s["mismatches"] == 2
    # DiLoCo θ digests that differ
    s = invariants.check([{"ev": "outer", "peer": 1, "key": [1, 3, 7], "digest": "x"},
                          {"ev": "outer", "peer": 2, "key": [1, 3, 7], "digest": "y"}])
    assert s["mismatches"] == 1


def test_checker_detects_planted_hangs_and_unclear_errors():
    s = invariants.check([_op(1, [1, 2, 0], seconds=40.0, deadline=24.0)], slack=10.0)
    assert s["hangs"] == 1
    assert invariants.check([_op(1, [1, 2, 0], seconds=33.0, deadline=24.0)], slack=10.0)["hangs"] == 0
    s = invariants.check([{"ev": "hang", "peer": 1, "what": "all_reduce", "seconds": 50, "deadline": 24},
                          {"ev": "silent", "slot": 2, "detail": "no record for 60 s"},
                          {"ev": "no_exit", "slot": 3, "detail": "did not exit"},
                          {"ev": "fail", "what": "update_topology", "seconds": 99.0, "deadline": 25.0}])
    assert s["hangs"] == 4
    s = invariants.check([{"ev": "lost", "peer": 1, "error": "MasterUnreachable"},
                          {"ev": "lost", "peer": 2, "error": "InvalidUsage", "message": "boom"}])
    assert s["unclear_errors"] == 1 and s["lost"] == {"MasterUnreachable": 1, "InvalidUsage": 1}


def test_checker_loss_must_fall_and_rates():
    falling = [{"ev": "step", "cell": 1, "t": float(i), "gstep": 10 * i, "n": 10, "loss": 3.0 - i / 50}
               for i in range(100)]
    flat = [dict(e, loss=2.0 + (e["gstep"] % 7) / 100) for e in falling]
    assert invariants.check(falling)["loss_falling"] is True
    assert invariants.check(flat[:50] + [dict(e, loss=3.0) for e in flat[50:]])["loss_falling"] is False
    assert invariants.check(falling[:5])["loss_falling"] is False  # too few steps: no evidence of training
    rates = invariants.work_rate(falling + [_op(1, [1, 2, i]) | {"t": 10.0 + i / 10} for i in range(20)], 0, 100)
    assert rates == {"diloco/1": pytest.approx(10.0), "allreduce/0": pytest.approx(0.2)}
    assert invariants.throughput_kept({"a": 9.0}, {"a": 10.0, "b": 1.0}) == {"a": 0.9, "b": 0.0}


def test_report_renders_json_reports(tmp_path):
    r = {"scenario": "kill-loop", "peers": 6, "duration": 120.0, "seed": 1, "faults_injected": {"kill": 11},
         "faults_skipped": 0, "peer_steps": 1070, "syncs_completed": 475, "collectives_completed": 1793,
         "collectives_aborted": 16, "mismatches": 0, "hangs": 0, "loss": {"1": {"first": 2.1, "last": 0.4}},
         "throughput_kept": {"allreduce/0": 0.93, "diloco/1": 0.6}, "ok": True, "command": "python -m chaos run"}
    bad = dict(r, scenario="mix", mismatches=2, ok=False, violations=["2 mismatches"])
    path = tmp_path / "r.json"
    path.write_text(json.dumps([r, bad]))
    md = report.markdown(report.load([str(path)]))
    lines = md.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| scenario |")
    assert "| kill 11 |" in lines[2] and "allreduce 93%, diloco 60%" in lines[2] and lines[2].endswith("PASS |")
    assert "FAIL: 2 mismatches" in lines[3]
    out = subprocess.run([sys.executable, "-m", "chaos", "report", str(path), "--md"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == md


# ---------------------------------------------------------------------------------------- campaigns
def _assert_clean(r: dict) -> None:
    detail = report.details(r)
    assert r["mismatches"] == 0, detail
    assert r["hangs"] == 0, detail
    assert r["unclear_errors"] == 0, detail
    assert r["collectives_completed"] > 0, detail
    assert r["faults_injected_total"] > 0, detail


# In `make test`. It failed in 2 of 4 full-suite runs once the master ride-through was merged: a
# SIGSTOPped DiLoCo peer took its own freeze for a master restart and re-joined mid-step (fixed:
# reconnect.Session.stalled and the master's incarnation id; see docs/chaos.md).
@pytest.mark.timeout(900)  # start-up (python + torch in 4 processes) is slow on a loaded 2-core machine
def test_mix_campaign_60s(tmp_path):
    """Kill, stop and join faults among 4 peers (2 raw all-reduce, 2 DiLoCo) for 60 s on loopback."""
    # Cold peer starts, not --zygote: forked replacements start in 0.3 s, and in 1 of 5 runs one
    # joined a DiLoCo cell just before its only state holder was killed, so the cell's new pair
    # restarted revisions 1.. under the same epoch (the checker artefact in docs/chaos.md).
    opts = Options(scenario="mix", peers=4, duration=60.0, seed=11, workload="both", log_dir=str(tmp_path),
                   quiet=True, slack=20.0)
    r = Campaign(opts).run()
    _assert_clean(r)
    assert r["outer_steps_completed"] > 0 and r["allreduces_completed"] > 0, report.details(r)
    assert r["loss_falling"] is True, report.details(r)
    assert r["ok"], report.details(r)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_soak_10_minutes(tmp_path):
    """6 peers, one SIGKILL every 10 s for 10 minutes: nothing lost, nothing hung."""
    opts = Options(scenario="kill-loop", peers=6, duration=600.0, seed=5, workload="both", log_dir=str(tmp_path),
                   quiet=True, slack=20.0)
    r = Campaign(opts).run()
    _assert_clean(r)
    assert r["faults_injected"].get("kill", 0) >= 50, r["faults_injected"]
    assert r["ok"], report.details(r)


def test_lossy_link_commands_for_both_backends():
    from chaos import netfaults

    ipt = netfaults.apply_cmds("lossy", "chaos", 1, 0.03, "iptables")
    assert [c[4] for c in ipt] == ["iptables"] * 2 and all("0.0300" in c for c in ipt)
    assert netfaults.restore_cmds("lossy", "chaos", 1, 0.03, "iptables")[0][5] == "-D"
    tail = netfaults.apply_cmds("lossy", "chaos", 1, 0.03, "taildrop")
    assert len(tail) == 2 and all(c[0] == "tc" and "tbf" in c and "limit" in c for c in tail)
    assert tail[0][1:3] == ["-n", "chaos-h1"] and "eth0" in tail[0]  # inside the namespace, and on the root end
    rate, burst, limit = netfaults.LOSSY_TAILDROP
    assert limit > 65536 and burst >= 65536 and str(limit) in tail[1]  # a 64 KiB GSO packet fits
    assert netfaults.restore_cmds("lossy", "chaos", 1, 0.03, "taildrop") == \
        netfaults.restore_cmds("slow", "chaos", 1, 1e6)
    with pytest.raises(ValueError):
        netfaults.apply_cmds("kill", "chaos", 1, 0.0)


def test_parse_drops_sums_every_qdisc():
    from chaos import netfaults

    text = ("qdisc tbf 8095: root refcnt 3 rate 50Mbit burst 256Kb limit 100000b \n"
            " Sent 32891916 bytes 21736 pkt (dropped 91, overlimits 2578 requeues 0) \n"
            " backlog 0b 0p requeues 0\n"
            "qdisc tbf 8096: root refcnt 2 rate 50Mbit burst 256Kb limit 100000b \n"
            " Sent 1000 bytes 10 pkt (dropped 2, overlimits 0 requeues 0) \n")
    assert netfaults.parse_drops(text) == (21746, 93)
    assert netfaults.parse_drops("") == (0, 0)


# ---------------------------------------------------------------------------------------- zygote
@pytest.mark.timeout(300)
def test_kill_loop_with_peers_forked_from_a_zygote(tmp_path):
    """--zygote: every peer (initial and replacement) is forked from one warmed process; a
    SIGKILLed peer is reaped, replaced and re-admitted, and nothing is lost."""
    opts = Options(scenario="kill-loop", peers=3, duration=25.0, seed=2, workload="allreduce",
                   log_dir=str(tmp_path), quiet=True, slack=20.0, zygote=True,
                   knobs=schedule.Knobs(kill_every=6.0))
    r = Campaign(opts).run()
    _assert_clean(r)
    assert r["zygote"] and r["faults_injected"].get("kill", 0) >= 3, r["faults_injected"]
    joined = [t for cell in r["replacement_seconds"].values() for t in cell["joined"]]
    assert len(joined) >= 2, r["replacement_seconds"]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e["ev"] == "zygote_ready" for e in events)
    assert r["ok"], report.details(r)


@pytest.mark.timeout(180)
def test_zygote_forks_real_peers_routes_their_records_and_reports_a_sigkill(tmp_path):
    """Two all-reduce peers forked by chaos.zygote work together; SIGKILL → reaped with -9;
    closing the zygote ends the other one too."""
    import os
    import queue
    import signal
    import time

    import pccl
    from chaos import zygote as zg
    from chaos.campaign import CONFIG_DEFAULTS

    records: queue.Queue = queue.Queue()
    env = {**os.environ, **CONFIG_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with open(tmp_path / "peers.log", "w") as log, pccl.Master("127.0.0.1", 0) as master:
        z = zg.Zygote(env, log, lambda pid, ev: records.put((pid, ev)), torch_too=False, ready_timeout=120)
        try:
            args = ["--workload", "allreduce", "--seed", "3", "--elems", "4096"]
            cell = {"PCCL_MASTER": master.address, "CHAOS_EPOCH_FILE": str(tmp_path / "epoch")}
            a = z.fork(args + ["--slot", "0"], cell)
            b = z.fork(args + ["--slot", "1"], cell)
            assert a.pid != b.pid and a.pid != z.proc.pid and a.poll() is None
            ops: dict[int, list[dict]] = {a.pid: [], b.pid: []}
            end = time.monotonic() + 120
            while min(len(v) for v in ops.values()) < 3:
                pid, ev = records.get(timeout=max(0.1, end - time.monotonic()))
                assert ev["pid"] == pid and pid in ops, ev
                if ev["ev"] == "op" and ev.get("world") == 2:
                    assert ev["exact"], ev
                    ops[pid].append(ev)
            assert os.getpgid(a.pid) == a.pid  # its own session: killpg reaches it
            os.killpg(a.pid, signal.SIGKILL)
            assert a.wait(30) == -signal.SIGKILL
            assert b.poll() is None
        finally:
            z.close()
        assert b.wait(30) is not None  # died with the zygote
        assert z.proc.returncode is not None

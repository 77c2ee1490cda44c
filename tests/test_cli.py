"""The pccl command line: launch (prefixing, exit status), status, master."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pccl
from pccl.status import query_status

PCCL = [sys.executable, "-m", "pccl.cli"]


def test_launch_runs_peers_prefixes_output_and_reports_success(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, time, numpy as np, pccl
        comm = pccl.Communicator().connect()
        while comm.world_size < 2:
            if comm.are_peers_pending():
                comm.update_topology()
            else:
                time.sleep(0.02)
        x = np.ones(10, dtype=np.float32)
        comm.all_reduce(x)
        print("sum", x[0], "index", os.environ["PCCL_LOCAL_INDEX"], flush=True)
        comm.close()
    """))
    r = subprocess.run(PCCL + ["launch", "-n", "2", "--", str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[peer 0] sum 2.0 index 0" in r.stdout and "[peer 1] sum 2.0 index 1" in r.stdout


def test_launch_exits_non_zero_when_a_peer_fails(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['PCCL_LOCAL_INDEX'] == '1' else 0)\n")
    r = subprocess.run(PCCL + ["launch", "-n", "2", "--", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "peers [1] failed" in r.stdout


def test_status_shows_peers_and_ring():
    with pccl.Master() as master:
        with pccl.Communicator(master.address) as comm:
            text = query_status(master.address)
            assert f"ring {comm.peer_id}" in text and "accepted" in text
            r = subprocess.run(PCCL + ["status", "--master", master.address], capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0 and "accepted" in r.stdout


def test_status_of_a_dead_master_is_a_clear_error():
    r = subprocess.run(PCCL + ["status", "--master", "127.0.0.1:9", "--timeout", "0.5"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "did not answer" in r.stderr

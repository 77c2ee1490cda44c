"""DiLoCo across real processes (ALGORITHMS.md §7 T5, T6): bit parity of θᵍ‖b after every outer
step, and a SIGKILLed peer mid-run. Workers are ``tests/optim_worker.py``; every wait is bounded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pccl
from cluster import Peer

WORKER = str(Path(__file__).with_name("optim_worker.py"))


class Worker(Peer):
    """An optimizer worker process; event reading and ``expect`` come from ``cluster.Peer``."""

    def __init__(self, index: int, env: dict, args: list[str]) -> None:
        super().__init__(index, subprocess.Popen([sys.executable, WORKER, "diloco", "--index", str(index), *args],
                                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                 stdin=subprocess.DEVNULL))

    def outer(self) -> dict[int, dict]:
        return {e["step"]: e for e in self.log if e["event"] == "outer"}


@pytest.fixture
def run_workers():
    made: list[Worker] = []
    masters: list[pccl.Master] = []

    def start(n: int, *args: str, **config) -> list[Worker]:
        cfg = pccl.Config.from_env(**config)
        m = pccl.Master("127.0.0.1", 0, config=cfg).start()
        masters.append(m)
        env = dict(os.environ, PCCL_MASTER=m.address, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        for k, v in config.items():
            env["PCCL_" + k.upper()] = str(v)
        ws = [Worker(i, env, list(args)) for i in range(n)]
        made.extend(ws)
        return ws

    yield start
    for w in made:
        if w.popen.poll() is None:
            w.popen.kill()
    for w in made:
        try:
            w.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
    for m in masters:
        m.close()


def _quantized_ring_available() -> bool:
    try:
        import pccl.algorithms.codecs  # noqa: F401
    except ImportError:
        return False
    import numpy as np

    with pccl.Master("127.0.0.1", 0) as m:
        comms = [pccl.Communicator(m.address, connections=1) for _ in range(2)]
        comms[0].connect()
        t = threading.Thread(target=comms[1].connect, daemon=True)
        t.start()
        try:
            end = time.monotonic() + 30
            while not comms[0].are_peers_pending():
                assert time.monotonic() < end
                time.sleep(0.01)
            comms[0].update_topology()
            t.join(30)
            errs: list = [None, None]

            def reduce(i):
                try:
                    comms[i].all_reduce(np.ones(8, np.float32), op=pccl.ReduceOp.AVG,
                                        quantization=pccl.Quantization.UINT8, timeout=30)
                except pccl.PcclError as exc:
                    errs[i] = exc
            ts = [threading.Thread(target=reduce, args=(i,), daemon=True) for i in range(2)]
            for x in ts:
                x.start()
            for x in ts:
                x.join(60)
            return errs == [None, None]
        finally:
            for c in comms:
                c.close()


def _check_parity(logs: list[dict], steps) -> None:
    for step in steps:
        hashes = {log[step]["hash"] for log in logs}
        assert len(hashes) == 1, f"outer step {step}: θᵍ‖b differs across peers: {hashes}"
        assert all(log[step]["drift"] == 0 for log in logs)


def test_sigkill_one_of_four_mid_run_and_bit_parity_of_the_survivors(run_workers):
    """T5 and T6 in one run (each worker process costs ~10 s of torch import here): 4 processes
    train DiLoCo; one is SIGKILLed after outer step 2; θᵍ‖b is identical on every live peer after
    every outer step (4 peers, then the 3 survivors), and the survivors' θᵍ keeps improving."""
    outer = 8
    ws = run_workers(4, "--world", "4", "--outer", str(outer), "--H", "10", "--width", "1024", peer_timeout=2)
    victim = ws[3]
    victim.expect("outer", timeout=240, step=2)
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait(10)
    survivors = ws[:3]
    for w in survivors:
        w.expect("done", timeout=240)
    logs = [w.outer() for w in survivors]
    _check_parity(logs + [victim.outer()], [1, 2])
    _check_parity(logs, range(1, outer + 1))
    worlds = [logs[0][s]["world"] for s in range(1, outer + 1)]
    assert worlds[:2] == [4, 4] and worlds[-1] == 3  # the dead peer was dropped, the others went on
    n_params = 16 * 1024 + 1024 + 1024 + 1
    for log in logs:  # §1.7: 2(N-1)/N of the float32 Δ per peer per outer step (±1 element per chunk)
        assert abs(log[1]["tx"] - 2 * 3 / 4 * 4 * n_params) <= 4 * 2 * 4
        assert abs(log[outer]["tx"] - 2 * 2 / 3 * 4 * n_params) <= 4 * 2 * 3
    evals = [logs[0][s]["eval"] for s in range(1, outer + 1)]
    assert evals[-1] < evals[2] < evals[0]  # the kill came after step 2: θᵍ keeps improving
    print(f"SIGKILL: worlds {worlds}; test loss of θᵍ per outer step {[round(x, 4) for x in evals]}; "
          f"attempts {[logs[0][s]['attempts'] for s in range(1, outer + 1)]}")


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "uint8"])
def test_t5_three_processes_keep_theta_and_momentum_bit_identical(run_workers, quantization):
    if quantization != "none" and not _quantized_ring_available():
        pytest.skip("quantized ring all-reduce not available")
    outer = 5
    ws = run_workers(3, "--world", "3", "--outer", str(outer), "--H", "10", "--quantization", quantization)
    for w in ws:
        w.expect("done", timeout=240)
    logs = [w.outer() for w in ws]
    _check_parity(logs, range(1, outer + 1))
    assert all(log[s]["world"] == 3 for log in logs for s in range(1, outer + 1))
    evals = [logs[0][s]["eval"] for s in range(1, outer + 1)]
    assert evals[-1] < evals[0]
    if quantization == "none":
        n_params = 16 * 64 + 64 + 64 + 1
        assert all(abs(log[outer]["tx"] - 2 * 2 / 3 * 4 * n_params) <= 4 * 2 * 3 for log in logs)
    print(f"T5 {quantization}: test loss of θᵍ {[round(x, 4) for x in evals]}")


@pytest.mark.slow
def test_diloco_training_continues_across_a_master_restart():
    """3 processes train DiLoCo; the master (its own process) is SIGKILLed after outer step 2 and a
    new one, with no state, starts on the same port. The peers re-register, re-form the group of 3
    and finish every outer step with θᵍ‖b bit-identical on all of them (nothing drifted)."""
    from cluster import MasterProcess, free_port

    port = free_port()
    env = dict(os.environ, PCCL_MASTER=f"127.0.0.1:{port}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PCCL_MASTER_RECONNECT_TIMEOUT="60", PCCL_MASTER_REGROUP_TIMEOUT="20")
    masters = [MasterProcess(port, env)]
    outer = 6
    ws = [Worker(i, env, ["--world", "3", "--outer", str(outer), "--H", "10", "--width", "256"]) for i in range(3)]
    try:
        ws[0].expect("outer", timeout=240, step=2)
        masters[0].kill()
        time.sleep(1.0)
        masters.append(MasterProcess(port, env))
        for w in ws:
            w.expect("done", timeout=240)
    finally:
        for w in ws:
            if w.popen.poll() is None:
                w.popen.kill()
            w.popen.wait(10)
        for mp in masters:
            mp.close()
    logs = [w.outer() for w in ws]
    _check_parity(logs, range(1, outer + 1))
    assert all(log[s]["world"] == 3 for log in logs for s in range(1, outer + 1))
    evals = [logs[0][s]["eval"] for s in range(1, outer + 1)]
    assert evals[-1] < evals[0]
    print(f"master restart: attempts per outer step {[logs[0][s]['attempts'] for s in range(1, outer + 1)]}")

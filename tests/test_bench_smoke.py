"""Smoke test of ``pccl bench``: N=2, a tiny buffer, one timed op; both systems appear in the table."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest

from pccl import bench

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (gloo)")


def test_parse_size() -> None:
    assert bench.parse_size("1") == 1 << 20
    assert bench.parse_size("16M") == 16 << 20
    assert bench.parse_size("64MiB") == 64 << 20
    assert bench.parse_size("512K") == 512 << 10
    assert bench.parse_size("1G") == 1 << 30
    assert abs(bench.busbw(1 << 20, 1e-3, 2) - (1 << 20) / 1e-3 / 1e9) < 1e-12


@needs_torch
@pytest.mark.timeout(120)  # ~10 s on a quiet 2-core VM; two `import torch` dominate
def test_bench_runs_both_systems(tmp_path, capsys) -> None:
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = bench.main(["--peers", "2", "--sizes", "64K", "--iters", "1", "--warmup", "1", "--repeats", "1",
                     "--json", str(out_json), "--markdown", str(out_md), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pccl GB/s" in text and "gloo GB/s" in text and "64 KiB" in text
    data = json.loads(out_json.read_text())
    systems = {r["system"] for r in data["measurements"]}
    assert systems == {"pccl", "gloo", "loopback"}
    row = data["summary"][0]
    assert row["pccl_busbw_gbs"] > 0 and row["gloo_busbw_gbs"] > 0 and row["ratio"] > 0
    rates = [r["loopback_gbs"] for r in data["measurements"] if r["system"] == "loopback"]
    assert len(rates) == 1 and row["cap_gbs"] == rates[0] / 2
    assert row["pccl_of_cap"] == row["pccl_busbw_gbs"] / row["cap_gbs"]
    assert "pccl/cap" in text
    md = out_md.read_text()
    assert md.startswith("### `pccl bench --peers 2") and "| 2 | 64 KiB |" in md


@needs_torch
@pytest.mark.timeout(120)
def test_bench_with_a_list_of_tensors(tmp_path, capsys) -> None:
    """--tensors: pccl's all_reduce_many against gloo's async ops; the correctness guard checks
    every element of every tensor (they are views of one buffer)."""
    out_md = tmp_path / "r.md"
    rc = bench.main(["--peers", "2", "--sizes", "64K", "--tensors", "5", "--iters", "2", "--warmup", "1",
                     "--repeats", "1", "--markdown", str(out_md), "--quiet"])
    assert rc == 0
    assert "each buffer as 5 tensors" in out_md.read_text() and "gloo GB/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--peers", "2", "--sizes", "16", "--tensors", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--peers", "2", "--sizes", "1K", "--tensors", "300"])  # 256 float32 elements


@needs_torch
@pytest.mark.timeout(120)
def test_bench_out_of_place_after_optimize_topology(tmp_path, capsys) -> None:
    """--out-of-place: pccl reduces into a second buffer (checked: dst holds the sum, src is
    unchanged); the markdown says so; it does not combine with --tensors. --optimize: the pccl
    world runs optimize_topology() (bandwidth probes) before measuring."""
    out_md, out_json = tmp_path / "r.md", tmp_path / "r.json"
    rc = bench.main(["--peers", "2", "--sizes", "64K", "--out-of-place", "--optimize", "--iters", "2",
                     "--warmup", "1", "--repeats", "1", "--markdown", str(out_md), "--json", str(out_json),
                     "--quiet"])
    assert rc == 0
    assert "pccl out of place, gloo in place" in out_md.read_text() and "gloo GB/s" in capsys.readouterr().out
    meta = json.loads(out_json.read_text())["meta"]
    assert meta["optimize"] is True and meta["out_of_place"] is True
    with pytest.raises(SystemExit):
        bench.main(["--peers", "2", "--sizes", "16", "--tensors", "2", "--out-of-place"])


def test_loopback_rate_measures_and_leaves_no_thread_or_socket_behind() -> None:
    import threading

    before = threading.active_count()
    t0 = time.monotonic()
    rate = bench.loopback_rate(seconds=0.2)
    assert rate > 1e6  # bytes/s: any host moves far more than 1 MB/s through loopback
    assert time.monotonic() - t0 < 5
    assert threading.active_count() == before


def test_correctness_guard_detects_a_wrong_element() -> None:
    import numpy as np

    n, iters = 3, 5
    good = np.full(1000, bench._expected(n, iters), dtype=np.float32)
    assert bench._expected(n, iters) == 6 * 3 ** 4
    assert bench._check(good, n, iters, np) is None
    bad = good.copy()
    bad[123] += 1
    problem = bench._check(bad, n, iters, np)
    assert problem is not None and "index 123" in problem


@pytest.mark.timeout(180)
def test_bench_sync_loopback_smoke(tmp_path, capsys) -> None:
    from pccl import bench_sync

    out = tmp_path / "s.json"
    assert bench_sync.main(["--mib", "2", "--repeats", "1", "--holders", "2", "--timeout", "90",
                            "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["holders"] == 2 and len(summary["multi_s"]) == len(summary["single_s"]) == 1
    assert "speed-up median" in capsys.readouterr().out

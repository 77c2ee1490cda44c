"""Measure the optimizers on the demo model: bytes on the wire per outer step against the formulas
of ALGORITHMS.md §1.7, SPSA payload per step, and DiLoCo's final loss against data-parallel at
equal tokens. Four peers are communicators in threads of this process (real master, real TCP).

    python tests/measure_optim.py [--steps 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch

import pccl
from pccl.demo_train import batch, baseline, encode_text, generate_text, loss_of, make_model, val_loss
from pccl.optim import DiLoCo, StreamingDiLoCo
from pccl.optim.spsa import SharedSeedSPSA
from test_shared_state import group as shared_group


def group(master, n):
    return shared_group(master, n, connections=1)


def run_peers(n, make_opt, steps, bs, record):
    master = pccl.Master("127.0.0.1", 0).start()
    comms = group(master, n)
    val = encode_text(generate_text(7, 20_000))
    results = [None] * n

    def peer(i):
        torch.set_num_threads(1)
        data = encode_text(generate_text(1000 + i, 200_000))
        model = make_model()
        opt = make_opt(model, comms[i])
        rng = np.random.default_rng(i)
        per_outer = []
        while opt.global_step < steps:
            x, y = batch(data, rng, bs, 32)
            loss = loss_of(model, x, y)
            loss.backward()
            before = opt.outer_step
            opt.step()
            opt.zero_grad()
            if opt.outer_step != before:
                per_outer.append(opt.last_outer_step_bytes)
        opt.finish()
        results[i] = {"val": val_loss(model, val, 32), "per_outer": per_outer, "digest": opt.theta_digest()}

    ts = [threading.Thread(target=peer, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(1800)
    for c in comms:
        c.close()
    master.close()
    record.update(results=results)
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sync-every", type=int, default=25)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--only", help="run just this configuration (diloco_fp32, diloco_uint8, streaming_fp4)")
    p.add_argument("--no-spsa", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    n, H = args.peers, args.sync_every
    nparams = sum(q.numel() for q in make_model().parameters())
    out: dict = {"params": nparams, "peers": n, "steps": args.steps, "H": H}

    def diloco(q):
        return lambda model, comm: DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0),
                                          comm, sync_every=H, quantization=q)

    for name, make, formula in [
        ("diloco_fp32", diloco(pccl.Quantization.NONE), 2 * (n - 1) / n * 4 * nparams),
        ("diloco_uint8", diloco(pccl.Quantization.UINT8), 2 * (n - 1) / n * 1 * nparams),
        ("streaming_fp4", lambda model, comm: StreamingDiLoCo(
            model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0), comm, sync_every=H * 2,
            fragments=2, overlap=1, alpha=0.5, quantization=pccl.Quantization.FP4),
         2 * (n - 1) / n * 0.5 * nparams / 2),
    ]:
        if args.only and name != args.only:
            continue
        rec: dict = {}
        t0 = time.time()
        res = run_peers(n, make, args.steps, 16, rec)
        tx = [b[0] for r in res for b in r["per_outer"][1:]]  # skip the first (joins, warm-up)
        cell = {"tx_per_outer_step_median": float(np.median(tx)), "formula": formula,
                "ratio_to_formula": float(np.median(tx)) / formula, "val_loss": [r["val"] for r in res],
                "identical": len({r["digest"] for r in res}) == 1, "seconds": time.time() - t0}
        out[name] = cell
        print(name, json.dumps(cell), flush=True)
    base = baseline(argparse.Namespace(steps=args.steps, batch=16, context=32, lr=3e-3, eval_every=args.steps), n)
    out["dp_val_loss"] = base[-1][1]
    for name in ("diloco_fp32", "diloco_uint8", "streaming_fp4"):
        if name in out:
            out[name]["vs_dp"] = float(np.mean(out[name]["val_loss"])) / base[-1][1]
    print("data-parallel baseline val loss", base[-1][1],
          {k: v["vs_dp"] for k, v in out.items() if isinstance(v, dict) and "vs_dp" in v}, flush=True)
    if args.no_spsa:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    # SPSA: payload and bytes on the wire per step
    master = pccl.Master("127.0.0.1", 0).start()
    comms = group(master, n)
    spsa_rec = []

    def spsa_peer(i):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        opt = SharedSeedSPSA(model, comms[i], eps=1e-3, lr=2e-3)
        x = torch.randn(64, 20, generator=torch.Generator().manual_seed(i))
        y = (x.sum(1) > 0).long()
        for _ in range(20):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        spsa_rec.append((opt.payload_bytes, opt.last_exchange.tx_bytes, opt.last_exchange.rx_bytes))

    ts = [threading.Thread(target=spsa_peer, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    for c in comms:
        c.close()
    master.close()
    out["spsa"] = {"payload_bytes_per_peer_per_step": spsa_rec[0][0], "wire_tx_per_step": spsa_rec[0][1]}
    print("spsa", out["spsa"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""Shared-seed SPSA (zeroth-order, one byte per peer per step on the wire) fine-tuning a small MLP.

Run: pccl launch -n 4 -- examples/spsa_finetune.py
Every peer probes its own random direction z (regenerated from a shared seed, never sent) with
two forward passes on its own minibatch, sends one byte (its quantized directional derivative),
and every peer applies all peers' updates in the same order, so the weights stay bit-identical.
"""
import os

import numpy as np
import torch

import pccl
from pccl.optim.spsa import SharedSeedSPSA

torch.set_num_threads(1)
shard = int(os.environ.get("PCCL_LOCAL_INDEX", "0"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
teacher = np.random.default_rng(123).standard_normal((20,))
rng = np.random.default_rng(shard)


def minibatch(n=64):
    x = rng.standard_normal((n, 20)).astype(np.float32)
    y = (x @ teacher > 0).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


comm = pccl.Communicator(connections=1)
comm.connect()
opt = SharedSeedSPSA(model, comm, eps=1e-3, lr=2e-3, samples=1)
for _ in range(400):
    x, y = minibatch()

    def closure():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y)

    loss = opt.step(closure)
    if opt.step_count % 50 == 0:
        print(f"step {opt.step_count}: world {comm.world_size}, loss {float(loss):.4f}, "
              f"{opt.payload_bytes} B payload sent this step")
comm.close()

"""DiLoCo on a tiny character-level transformer over generated text.

Run: pccl launch -n 4 -- examples/diloco_train.py     (kill a peer any time: the others go on)
Each peer trains on its own shard; every H inner steps the peers average their outer gradients
(θᵍ − φ) with one all-reduce and apply outer Nesterov SGD; θᵍ, the outer momentum and the step
counters live in a pccl.SharedState, so a peer started later catches up at the next outer step.
"""
import os

import numpy as np
import torch

import pccl
from pccl.demo_train import batch, encode_text, generate_text, loss_of, make_model, val_loss
from pccl.optim import DiLoCo

torch.set_num_threads(1)
shard = int(os.environ.get("PCCL_LOCAL_INDEX", "0"))
comm = pccl.Communicator(connections=1)
comm.connect()
data = encode_text(generate_text(1000 + shard, 200_000))
val = encode_text(generate_text(7, 20_000))
model = make_model()
inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
opt = DiLoCo(model, inner, comm, sync_every=25, outer_lr=0.7, outer_momentum=0.9, nesterov=True,
             quantization=pccl.Quantization.UINT8)
rng = np.random.default_rng(shard)
while opt.global_step < 300:
    x, y = batch(data, rng, 16, 32)
    loss = loss_of(model, x, y)
    loss.backward()
    opt.step()  # an inner step; every 25th also runs the outer step (all-reduce, sync, retries)
    opt.zero_grad()
    if opt.global_step % 25 == 0:
        tx, rx = opt.last_outer_step_bytes
        print(f"step {opt.global_step}: world {comm.world_size}, train {loss.item():.3f}, "
              f"val {val_loss(model, val, 32):.3f}, outer step sent {tx} B, theta {opt.theta_digest()[:12]}")
opt.finish()
comm.close()

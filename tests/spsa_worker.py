"""Z4 regeneration parity: one simulated SPSA machine in its own process (no network, no torch).

    python tests/spsa_worker.py ORDER

Prints one JSON object: ``z``, the SHA-256 of the perturbations z(t, i, j) of a grid of seeds
(each over several tensor sizes, concatenated in sorted seed order, whatever ORDER generated them
in: the generator is counter based, so call order must not matter), and ``theta``, the SHA-256 of
float32 θ after 100 steps of the shared update with 3 machines and fixed one-byte codes (the part
every peer must compute bit-identically: generator, codec table, sorted accumulation, casts).
ORDER 0 generates in sorted order, 1 reversed, 2 shuffled.

spsa.py is loaded from its file, not through the ``pccl.optim`` package, whose ``__init__``
imports torch (2–15 s per process on these VMs); the module itself needs only numpy and pccl.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np


def _load_spsa():
    spec = importlib.util.spec_from_file_location("_spsa_under_test",
                                                  Path(__file__).resolve().parents[1] / "pccl" / "optim" / "spsa.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_spsa = _load_spsa()
decode, next_ref, perturbation, update_deltas = _spsa.decode, _spsa.next_ref, _spsa.perturbation, _spsa.update_deltas

STEPS = (0, 1, 2, 1000, 1 << 40)
PEERS = (0, 1, 7, (1 << 63) + 5)
SAMPLES = (0, 1, 5)
SIZES = (1, 63, 64, 65, 1000)


def z_digest(order: int) -> str:
    seeds = [(t, i, j) for t in STEPS for i in PEERS for j in SAMPLES]
    todo = list(seeds)
    if order == 1:
        todo.reverse()
    elif order == 2:
        random.Random(order).shuffle(todo)
    got = {s: b"".join(z.tobytes() for z in perturbation(3, *s, SIZES)) for s in todo}
    return hashlib.sha256(b"".join(got[s] for s in seeds)).hexdigest()


def theta_digest(steps: int = 100, machines: int = 3, d: int = 100) -> str:
    theta = [np.ones(d, np.float32), np.full(7, -0.5, np.float32)]
    ref = 1.0
    for t in range(steps):
        codes = np.array([((t * 37 + i * 101) % 255) - 127 for i in range(machines)], np.int8)
        ghat = decode(codes, ref)
        contrib = [(i + 1, 0, float(g)) for i, g in enumerate(ghat)]
        for th, delta in zip(theta, update_deltas([a.size for a in theta], 3, t, contrib, 1e-3 / machines),
                             strict=True):
            th += delta.astype(np.float32)  # cast once, then one float32 add, as the optimizer does
        ref = next_ref(ghat, ref)
    return hashlib.sha256(b"".join(a.astype("<f4").tobytes() for a in theta)).hexdigest()


if __name__ == "__main__":
    print(json.dumps({"order": int(sys.argv[1]), "z": z_digest(int(sys.argv[1])), "theta": theta_digest()}),
          flush=True)

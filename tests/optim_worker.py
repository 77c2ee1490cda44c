"""The toy problem of the optimizer tests, in-process helpers, and a worker process.

Toy (ALGORITHMS.md §7): teacher-student regression, a 16→64→1 tanh MLP, noise σ 0.1, Adam
lr 3e-3 betas (0.9, 0.95), batch 32 per worker, test set of 4000; everything generated from
fixed seeds, so runs are deterministic.

As a process (``python tests/optim_worker.py diloco --index I --world N ...``) it connects to
``$PCCL_MASTER``, waits for N peers, trains DiLoCo and prints one JSON object per line:
``joined``, then ``outer`` after every outer step (``hash`` = SHA-256 of θᵍ‖b, ``loss`` = mean
training loss of the step's inner steps, ``eval`` = test loss of θᵍ, ``world``, ``tx`` bytes sent,
``attempts``), then ``done``; ``crash`` on an exception.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback

import pytest
import torch

D_IN, HIDDEN = 16, 64



@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per op, and a short GIL switch interval: the master and the peers' control
    threads live in this process, beside up to four training threads."""
    n, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)
    yield
    torch.set_num_threads(n)
    sys.setswitchinterval(interval)

def mlp(dtype: torch.dtype = torch.float32, width: int = HIDDEN) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(D_IN, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).to(dtype)


def student(seed: int = 0, dtype: torch.dtype = torch.float32, width: int = HIDDEN) -> torch.nn.Module:
    """The sanity toy's init: N(0, 1/fan_in) weights, zero biases (own generator: thread-safe)."""
    g = torch.Generator().manual_seed(seed)
    model = mlp(torch.float64, width)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(width, D_IN, generator=g, dtype=torch.float64) / D_IN ** 0.5)
        model[2].weight.copy_(torch.randn(1, width, generator=g, dtype=torch.float64) / width ** 0.5)
        model[0].bias.zero_()
        model[2].bias.zero_()
    return model.to(dtype)


_TEACHER: dict[torch.dtype, torch.nn.Module] = {}


def teacher(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if dtype not in _TEACHER:
        g = torch.Generator().manual_seed(123)
        t = mlp(torch.float64)
        with torch.no_grad():  # as in algorithms_sanity/diloco.py: N(0, 1/fan_in) weights, W1 doubled
            t[0].weight.copy_(torch.randn(HIDDEN, D_IN, generator=g, dtype=torch.float64) * (2.0 / D_IN ** 0.5))
            t[2].weight.copy_(torch.randn(1, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN ** 0.5)
            t[0].bias.zero_()
            t[2].bias.zero_()
        _TEACHER[dtype] = t.to(dtype)
    return _TEACHER[dtype]


def batch(gen: torch.Generator, n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(torch.float64)(x) + 0.1 * noise
    return x.to(dtype), y.to(dtype)


_TEST: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}


def eval_loss(model: torch.nn.Module) -> float:
    dtype = next(model.parameters()).dtype
    if dtype not in _TEST:
        _TEST[dtype] = batch(torch.Generator().manual_seed(999), 4000, dtype)
    x, y = _TEST[dtype]
    with torch.no_grad():
        return float(0.5 * torch.mean((model(x) - y) ** 2))


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.mean((model(x) - y) ** 2)


class TinyAdam:
    """Adam (β 0.9/0.95, ε 1e-8, no weight decay) with the torch.optim surface the optimizers use.

    Not torch.optim.Adam because constructing any torch.optim.Optimizer imports torch._dynamo
    (8-14 s of CPU on these VMs, per process); the tests that compare with torch.optim use it.
    """

    def __init__(self, params, lr: float = 3e-3, betas=(0.9, 0.95), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr}]
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.t += 1
        (b1, b2), lr = self.betas, self.param_groups[0]["lr"]
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / bc1)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"t": self.t, "m": [x.clone() for x in self.m], "v": [x.clone() for x in self.v]}

    def load_state_dict(self, sd: dict) -> None:
        self.t = sd["t"]
        for dst, src in zip(self.m + self.v, sd["m"] + sd["v"], strict=True):
            dst.copy_(src)


def adam(model: torch.nn.Module, lr: float = 3e-3) -> TinyAdam:
    return TinyAdam(model.parameters(), lr=lr)


def train_plain(steps: int, batch_size: int, seed: int = 1) -> float:
    """Data-parallel (batch 128 = 4 × 32) or single-worker baseline: test loss after ``steps``."""
    model = student()
    run_steps(model, adam(model), dataset(seed, steps, batch_size))
    return eval_loss(model)


def run_steps(model, opt, data, on_step=None) -> list[float]:
    """Train on every (x, y) of ``data``; returns the training losses."""
    losses = []
    for x, y in data:
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(opt)
    return losses


def dataset(seed: int, steps: int, batch_size: int = 32, dtype: torch.dtype = torch.float32):
    """``steps`` batches drawn at once (one teacher pass): a list of (x, y)."""
    x, y = batch(torch.Generator().manual_seed(seed), steps * batch_size, dtype)
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


class FakeGroup:
    """n in-process stand-ins for a Communicator, for unit tests of the optimizers' maths only.

    Implements what the optimizers call: ``all_reduce_many`` (AVG: sum in rank order, then one
    division, like the ring's finalize), ``sync_shared_state`` (no transfer), ``are_peers_pending``,
    ``update_topology``, ``world_size``, ``topology``, ``peer_id``. Peers meet at a barrier, so
    each must run in its own thread (n = 1 needs none). ``on_reduce(rank, tensors)`` is called
    at entry; with ``delay`` it sleeps before reducing and counts in ``mutations`` the buffers that
    changed meanwhile (a background reduce's buffer must not be touched by the caller).
    """

    def __init__(self, n: int, on_reduce=None, delay: float = 0.0) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list = [None] * n
        self.on_reduce, self.delay = on_reduce, delay
        self.mutations = 0
        self.comms = [FakeComm(self, r) for r in range(n)]


class FakeComm:
    def __init__(self, group: FakeGroup, rank: int) -> None:
        self.group, self.rank, self.peer_id = group, rank, rank
        self.reduces = 0

    @property
    def world_size(self) -> int:
        return self.group.n

    @property
    def topology(self) -> tuple[int, ...]:
        return tuple(range(self.group.n))

    def are_peers_pending(self) -> bool:
        return False

    def update_topology(self, admit: bool = True) -> None:
        pass

    def sync_shared_state(self, state, strategy=None, timeout=None):
        import pccl

        state.revision = state.revision if state.synced_revision is None else state.synced_revision + 1
        state.synced_revision = state.revision
        return pccl.SyncInfo(0, 0, state.revision)

    def all_reduce_many(self, tensors, op=None, quantization=None, max_in_flight=16, tag_base=0, algorithm=None):
        import pccl

        g = self.group
        if g.on_reduce is not None:
            g.on_reduce(self.rank, tensors)
        if g.delay:  # the caller keeps training meanwhile: its buffers must not change
            before = [t.clone() for t in tensors]
            time.sleep(g.delay)
            g.mutations += sum(not torch.equal(a, b) for a, b in zip(before, tensors, strict=True))
        self.reduces += 1
        g.slots[self.rank] = tensors
        g.barrier.wait()
        out = []
        for i in range(len(tensors)):
            acc = g.slots[0][i].clone()
            for r in range(1, g.n):
                acc.add_(g.slots[r][i])
            out.append(acc.div_(g.n))
        g.barrier.wait()  # everybody has read every input; from here each writes only its own
        for t, o in zip(tensors, out, strict=True):
            t.copy_(o)
        return [pccl.ReduceInfo(g.n, 0, 0, 0.0) for _ in tensors]


def together(fns, timeout: float = 120.0):
    """Run one callable per thread at once; returns (results, errors). Every join is bounded."""
    out, err = [None] * len(fns), [None] * len(fns)

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            err[i] = exc
            traceback.print_exc()

    ts = [threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(fns)]
    for t in ts:
        t.start()
    end = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.0, end - time.monotonic()))
        assert not t.is_alive(), "a worker thread hung"
    return out, err


def group(master, n: int, connections: int = 1):
    """n connected communicators in one group (the first admits the others)."""
    import pccl

    first = pccl.Communicator(master.address, connections=connections).connect()
    rest = [pccl.Communicator(master.address, connections=connections) for _ in range(n - 1)]
    ts = [threading.Thread(target=c.connect, daemon=True) for c in rest]
    for t in ts:
        t.start()
    deadline = time.monotonic() + 30
    while sum(not p.accepted for p in master.core.peers.values()) < n - 1:
        assert time.monotonic() < deadline, "peers did not register"
        time.sleep(0.01)
    first.update_topology()
    for t in ts:
        t.join(30)
    comms = [first] + rest
    assert all(c.world_size == n for c in comms)
    return comms


# ----------------------------------------------------------------------------- worker process
def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def _join(comm, world: int, deadline: float = 90.0) -> None:
    import pccl

    end = time.monotonic() + deadline
    comm.connect()
    while comm.world_size < world:
        if time.monotonic() > end:
            raise TimeoutError(f"world stayed at {comm.world_size}")
        try:
            if comm.are_peers_pending():
                comm.update_topology()
            else:
                time.sleep(0.02)
        except pccl.RETRYABLE:
            continue


def worker(args) -> None:
    import pccl
    from pccl.optim import DiLoCo

    torch.set_num_threads(1)
    comm = pccl.Communicator(connections=1)
    _join(comm, args.world)
    emit("joined", peer_id=comm.peer_id, world=comm.world_size)
    model = student(0, width=args.width)
    quant = pccl.Quantization(args.quantization)
    opt = DiLoCo(model, adam(model), comm, sync_every=args.H, quantization=quant,
                 retry=pccl.optim.RetryPolicy(attempts=5, seconds=120.0))
    data = dataset(100 + args.index, args.outer * args.H)
    for k in range(args.outer):
        losses = run_steps(model, opt, data[k * args.H:(k + 1) * args.H])
        emit("outer", step=opt.outer_step, hash=opt.theta_digest(), loss=sum(losses) / len(losses),
             eval=eval_loss(model), world=comm.world_size, tx=opt.last_outer_step.tx_bytes, attempts=opt.last_outer_step.attempts,
             drift=opt.drift_repairs)
        if args.pause:
            time.sleep(args.pause)
    emit("done", eval_loss=eval_loss(model))
    comm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["diloco"])
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--outer", type=int, default=5)
    ap.add_argument("--H", type=int, default=10)
    ap.add_argument("--width", type=int, default=HIDDEN)
    ap.add_argument("--pause", type=float, default=0.0)
    ap.add_argument("--quantization", default="none")
    args = ap.parse_args()
    try:
        worker(args)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        emit("crash", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        sys.exit(1)


if __name__ == "__main__":
    main()

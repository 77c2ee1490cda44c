"""DiLoCo and async DiLoCo (ALGORITHMS.md §7 T1–T4, T6, A1–A4): the outer maths on plain tensors,
then learning and joins with real communicators in threads (in-process master, real TCP)."""
from __future__ import annotations

import math
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch.optim.sgd import sgd

import pccl
from pccl.optim import DiLoCo, RetryPolicy, outer_sgd_
from pccl.optim import _resilient as rs
from optim_worker import (  # noqa: F401 - one_thread is an autouse fixture
    one_thread,
    FakeGroup, TinyAdam, adam, dataset, group, loss_fn, run_steps, student, eval_loss, together, train_plain,
)

# Reduced toy length for the default suite (the spec's 2000 steps / H=25 runs are marked slow).
# Measured on this toy (in-process stand-in communicators): DiLoCo/DP 0.87, DiLoCo/single 0.64 at
# 400 steps; 0.83 and 0.50 at 2000 steps (spec: <= 1.10 and <= 0.8).
STEPS, H = 400, 10




@pytest.fixture
def master():
    with pccl.Master("127.0.0.1", 0) as m:
        yield m


def close_all(comms):
    for c in comms:
        c.close()


class Synthetic:
    """An inner "optimizer" with a synthetic map φ ← φ − γ(φ − a) per parameter (ALGORITHMS §7 A1)."""

    def __init__(self, params, gamma, targets):
        self.params, self.gamma, self.targets = list(params), gamma, targets
        self.param_groups = [{"params": self.params}]

    def step(self, closure=None):
        with torch.no_grad():
            for p, a in zip(self.params, self.targets, strict=True):
                apply_synthetic(p, a, self.gamma)

    def zero_grad(self, set_to_none=True):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


class PlainSGD(Synthetic):
    """p ← p − lr·grad (torch.optim.SGD without momentum)."""

    def __init__(self, params, lr):
        super().__init__(params, lr, None)

    def step(self, closure=None):
        with torch.no_grad():
            for p in self.params:
                p.sub_(p.grad, alpha=self.gamma)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def apply_synthetic(p, a, gamma):
    d = torch.sub(p, a)
    d.mul_(gamma)
    p.sub_(d)


class Two(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(5, generator=g, dtype=dtype))


# ----------------------------------------------------------------------------- T3: outer optimizer
@pytest.mark.parametrize("lr,mu,nesterov", [(0.7, 0.9, True), (0.7, 0.9, False), (1.0, 0.0, True), (0.3, 0.5, True)])
def test_t3_outer_sgd_matches_closed_form_and_torch_sgd(lr, mu, nesterov):
    rng = np.random.default_rng(3)
    theta0 = rng.standard_normal(50)
    deltas = [rng.standard_normal(50) * 0.1 for _ in range(5)]
    # closed form, ALGORITHMS §1.2
    theta, b = theta0.copy(), None
    for d in deltas:
        b = d.copy() if b is None else mu * b + d
        theta = theta - lr * ((d + mu * b) if nesterov else b)
    ours_t, ours_b = torch.tensor(theta0), torch.zeros(50, dtype=torch.float64)
    ref, buf = [torch.tensor(theta0)], [None]
    for i, d in enumerate(deltas):
        outer_sgd_([ours_t], [ours_b], [torch.tensor(d)], lr, mu, nesterov, first=i == 0)
        # torch.optim.SGD(nesterov=...).step() runs exactly this function (the class itself is not
        # constructed: any torch.optim.Optimizer imports torch._dynamo, ~10 s of CPU here)
        sgd(ref, [torch.tensor(d)], buf, weight_decay=0.0, momentum=mu, lr=lr, dampening=0.0,
            nesterov=nesterov and mu > 0, maximize=False, foreach=False)
    ref = ref[0]
    assert np.max(np.abs(ours_t.numpy() - theta)) <= 1e-12
    assert torch.max(torch.abs(ours_t - ref)).item() <= 1e-12


# ----------------------------------------------------------------------------- T1, T2: degenerate cases
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_t1_world_of_one_h1_fedavg_is_the_inner_optimizer(master, dtype, tol):
    data = dataset(5, 300, dtype=dtype)
    ref = student(0, dtype)
    ref_opt = adam(ref)
    model = student(0, dtype)
    with pccl.Communicator(master.address).connect() as comm:
        opt = DiLoCo(model, adam(model), comm, sync_every=1,
                     outer_lr=1.0, outer_momentum=0.0, outer_dtype=dtype)
        worst = 0.0
        for x, y in data:
            for m, o in ((ref, ref_opt), (model, opt)):
                loss_fn(m, x, y).backward()
                o.step()
                o.zero_grad()
            for t, r in zip(opt.theta, ref.parameters(), strict=True):
                worst = max(worst, (torch.max(torch.abs(t - r.detach())) / max(1.0, torch.max(torch.abs(r)).item())).item())
        assert opt.outer_step == 300
    assert worst <= tol
    print(f"T1 {dtype}: max relative deviation {worst:.3g} over 300 steps")


def test_t2_h1_sgd_fedavg_equals_data_parallel_sgd():
    M, steps, lr = 4, 300, 0.05
    datas = [dataset(100 + m, steps, dtype=torch.float64) for m in range(M)]
    ref = student(0, torch.float64)
    ref_opt = PlainSGD(ref.parameters(), lr)
    fake = FakeGroup(M)

    def worker(m):
        model = student(0, torch.float64)
        opt = DiLoCo(model, PlainSGD(model.parameters(), lr), fake.comms[m], sync_every=1,
                     outer_lr=1.0, outer_momentum=0.0, outer_dtype=torch.float64)
        thetas = []
        for x, y in datas[m]:
            loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()
            thetas.append([t.clone() for t in opt.theta])
        return thetas

    out, err = together([lambda m=m: worker(m) for m in range(M)])
    assert err == [None] * M
    worst = 0.0
    for s in range(steps):
        # DP-SGD on the mean of the 4 micro-batch gradients
        grads = []
        for m in range(M):
            ref.zero_grad()
            loss_fn(ref, *datas[m][s]).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for i, p in enumerate(ref.parameters()):
            p.grad = sum(g[i] for g in grads) / M
        ref_opt.step()
        ref_opt.zero_grad()
        for t, r in zip(out[0][s], ref.parameters(), strict=True):
            worst = max(worst, (torch.max(torch.abs(t - r.detach())) / max(1.0, torch.max(torch.abs(r)).item())).item())
    assert all(torch.equal(a, b) for o in out[1:] for a, b in zip(o[-1], out[0][-1], strict=True))
    assert worst <= 1e-12
    print(f"T2: max relative deviation from DP-SGD {worst:.3g} over {steps} steps")


# ----------------------------------------------------------------------------- A1, A3: async maths
def test_a1_delayed_recurrence_is_exact_and_the_reduced_buffer_is_never_touched():
    M, K, Hs, lr, mu = 2, 8, 3, 0.5, 0.3
    gammas = [0.1, 0.25]
    targets = [[torch.full((3, 4), float(m + 1), dtype=torch.float64), torch.full((5,), -float(m), dtype=torch.float64)]
               for m in range(M)]
    fake = FakeGroup(M, delay=0.05)
    records: list[list] = [[] for _ in range(M)]

    def worker(m):
        model = Two()
        opt = DiLoCo(model, Synthetic(model.parameters(), gammas[m], targets[m]), fake.comms[m], sync_every=Hs,
                     outer_lr=lr, outer_momentum=mu, delayed=True, outer_dtype=torch.float64)
        for _ in range(K):
            for _ in range(Hs):
                opt.step()
            records[m].append([t.clone() for t in opt.theta])
        opt.finish()
        records[m].append([t.clone() for t in opt.theta])

    _, err = together([lambda m=m: worker(m) for m in range(M)])
    assert err == [None] * M
    assert fake.mutations == 0

    # closed form: s_1 = s_0, s_{k+1} = OuterOpt(s_k, Δ̄(s_{k-1})), same ops in the same order
    def mean_delta(s):
        deltas = []
        for m in range(M):
            phi = [t.clone() for t in s]
            for _ in range(Hs):
                for p, a in zip(phi, targets[m], strict=True):
                    apply_synthetic(p, a, gammas[m])
            deltas.append([torch.sub(t, p) for t, p in zip(s, phi, strict=True)])
        out = []
        for i in range(len(s)):
            acc = deltas[0][i].clone()
            for m in range(1, M):
                acc.add_(deltas[m][i])
            out.append(acc.div_(M))
        return out

    s_prev = [p.detach().clone() for p in Two().parameters()]
    s = [t.clone() for t in s_prev]
    b = [torch.zeros_like(t) for t in s]
    expected = [[t.clone() for t in s]]  # after iteration 0: s_1 = s_0
    for k in range(1, K + 1):
        d = mean_delta(s_prev)
        s_prev = [t.clone() for t in s]
        outer_sgd_(s, b, d, lr, mu, True, first=k == 1)
        expected.append([t.clone() for t in s])
    for m in range(M):
        for k in range(K + 1):
            assert all(torch.equal(a, e) for a, e in zip(records[m][k], expected[k], strict=True)), (m, k)


def test_a3_async_with_momentum_warns():
    model = Two()
    with pytest.warns(RuntimeWarning, match="unstable"):
        DiLoCo(model, Synthetic(model.parameters(), 0.1, [torch.zeros(3, 4), torch.zeros(5)]), FakeGroup(1).comms[0],
               sync_every=2, outer_lr=0.7, outer_momentum=0.9, delayed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiLoCo(model, Synthetic(model.parameters(), 0.1, [torch.zeros(3, 4), torch.zeros(5)]), FakeGroup(1).comms[0],
               sync_every=2, outer_lr=0.7, outer_momentum=0.0, delayed=True)
        DiLoCo(model, Synthetic(model.parameters(), 0.1, [torch.zeros(3, 4), torch.zeros(5)]), FakeGroup(1).comms[0],
               sync_every=2, outer_lr=0.7, outer_momentum=0.9, delayed=False)


# ----------------------------------------------------------------------------- retries, checkpoints
class Flaky:
    """A world-of-two stand-in whose first ``fail`` reduces raise PeerFailure after reducing half."""

    def __init__(self, fail):
        self.fail, self.calls, self.updates = fail, 0, []
        self.world_size, self.topology = 2, (0, 1)

    def all_reduce_many(self, tensors, op=None, quantization=None, max_in_flight=16, tag_base=0, algorithm=None):
        self.calls += 1
        if self.calls <= self.fail:
            tensors[0].mul_(0.5)  # a partial result, as when some tensors committed before a death
            raise pccl.PeerFailure("peer 1 died")
        return [pccl.ReduceInfo(2, 8, 8, 0.0) for _ in tensors]

    def update_topology(self, admit=True):
        self.updates.append(admit)


def test_reduce_retries_refill_and_are_bounded():
    bufs = [torch.zeros(4), torch.zeros(3)]
    fill = lambda: [b.fill_(1.0) for b in bufs]  # noqa: E731
    comm = Flaky(2)
    res = rs.reduce_avg(comm, bufs, fill, pccl.Quantization.NONE, RetryPolicy(attempts=3))
    assert res.attempts == 3 and comm.updates == [False, False]  # newcomers stay pending mid-step
    assert all(torch.equal(b, torch.ones_like(b)) for b in bufs)  # refilled: no half-reduced leftovers
    assert (res.tx_bytes, res.rx_bytes, res.world_size) == (16, 16, 2)
    with pytest.raises(pccl.PeerFailure):
        rs.reduce_avg(Flaky(10), bufs, fill, pccl.Quantization.NONE, RetryPolicy(attempts=3))


class MasterRestarts(Flaky):
    """The master is lost ``fail`` times (MasterLost), then the reduce works."""

    def all_reduce_many(self, tensors, op=None, quantization=None, max_in_flight=16, tag_base=0, algorithm=None):
        self.calls += 1
        if self.calls <= self.fail:
            tensors[0].mul_(0.5)
            raise pccl.MasterLost("lost the control connection to the master")
        return [pccl.ReduceInfo(2, 8, 8, 0.0) for _ in tensors]


def test_master_losses_are_retried_after_update_topology_without_spending_attempts():
    bufs = [torch.zeros(4), torch.zeros(3)]
    fill = lambda: [b.fill_(1.0) for b in bufs]  # noqa: E731
    assert issubclass(pccl.MasterLost, pccl.RETRYABLE)
    comm = MasterRestarts(4)
    res = rs.reduce_avg(comm, bufs, fill, pccl.Quantization.NONE, RetryPolicy(attempts=2))
    assert res.attempts == 5 and comm.updates == [False] * 4
    assert all(torch.equal(b, torch.ones_like(b)) for b in bufs)
    with pytest.raises(pccl.MasterLost):  # still bounded, by the policy's seconds
        rs.reduce_avg(MasterRestarts(10**6), bufs, fill, pccl.Quantization.NONE, RetryPolicy(attempts=2, seconds=0.05))


class MixedWorlds(Flaky):
    """all_reduce_many's own retry reduced the first tensor over 4 peers and the rest over 3."""

    def all_reduce_many(self, tensors, op=None, quantization=None, max_in_flight=16, tag_base=0, algorithm=None):
        self.calls += 1
        tensors[0].mul_(0.5)
        first = 4 if self.calls == 1 else 3
        return [pccl.ReduceInfo(first if i == 0 else 3, 8, 8, 0.0) for i in range(len(tensors))]


def test_a_reduce_over_two_memberships_is_redone_over_the_survivors():
    bufs = [torch.zeros(4), torch.zeros(3)]
    comm = MixedWorlds(0)
    res = rs.reduce_avg(comm, bufs, lambda: [b.fill_(1.0) for b in bufs], pccl.Quantization.NONE, RetryPolicy())
    assert comm.calls == 2 and res.attempts == 2 and res.world_size == 3
    assert comm.updates == []  # all_reduce_many already updated the topology


class LiveStateAdam(TinyAdam):
    """Returns references to its live state, as torch.optim.Optimizer.state_dict() does."""

    def state_dict(self):
        return {"t": self.t, "m": self.m, "v": self.v}


def test_state_dict_round_trip():
    data = dataset(9, 40)
    model = student()
    opt = DiLoCo(model, LiveStateAdam(model.parameters()), FakeGroup(1).comms[0], sync_every=10)
    run_steps(model, opt, data[:25])
    sd = opt.state_dict()
    model2 = student(seed=1)
    opt2 = DiLoCo(model2, LiveStateAdam(model2.parameters()), FakeGroup(1).comms[0], sync_every=10)
    opt2.load_state_dict(sd)
    assert opt2.theta_digest() == opt.theta_digest() and opt2.global_step == opt.global_step == 25
    # local φ is not part of the checkpoint: restart both from θᵍ and train on
    opt._load_model()
    run_steps(model, opt, data[25:])
    run_steps(model2, opt2, data[25:])
    assert opt2.theta_digest() == opt.theta_digest() and opt.outer_step == 4


# ----------------------------------------------------------------------------- real communicators
def diloco_run(master, n, steps, sync_every, inner=adam, **kw):
    comms = group(master, n)
    try:
        def worker(m):
            model = student()
            opt = DiLoCo(model, inner(model), comms[m], sync_every=sync_every, **kw)
            losses = run_steps(model, opt, dataset(100 + m, steps))
            opt.finish()
            return eval_loss(model), opt.theta_digest(), opt.last_outer_step, losses
        out, err = together([lambda m=m: worker(m) for m in range(n)], timeout=300)
        assert err == [None] * n, err
        assert len({o[1] for o in out}) == 1  # θᵍ‖b identical on every peer
        return out[0]
    finally:
        close_all(comms)


class WithoutMany:
    """A Communicator without ``all_reduce_many`` (as before it existed): the fallback path."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        if name == "all_reduce_many":
            raise AttributeError(name)
        return getattr(self._comm, name)


def test_fallback_without_all_reduce_many_gives_the_same_bytes(master):
    digests = []
    for wrap in (lambda c: c, WithoutMany):
        comms = group(master, 2)
        try:
            def worker(m, wrap=wrap, comms=comms):
                model = student()
                opt = DiLoCo(model, adam(model), wrap(comms[m]), sync_every=10, bucket_bytes=1024)
                run_steps(model, opt, dataset(100 + m, 20))
                assert len(opt._work.buckets) == 2 and opt.last_outer_step.world_size == 2
                return opt.theta_digest()
            out, err = together([lambda m=m: worker(m) for m in range(2)])
            assert err == [None, None] and out[0] == out[1]
            digests.append(out[0])
        finally:
            close_all(comms)
    assert digests[0] == digests[1]


def test_t4_diloco_learns_like_data_parallel(master):
    t0 = time.monotonic()
    loss, _, stats, _ = diloco_run(master, 4, STEPS, H)
    dp, single = train_plain(STEPS, 128), train_plain(STEPS, 32)
    print(f"T4 ({STEPS} steps, H={H}): DiLoCo {loss:.4f}  DP(B=128) {dp:.4f}  single {single:.4f}  "
          f"ratios {loss / dp:.3f} {loss / single:.3f}; last outer step tx {stats.tx_bytes} B; "
          f"{time.monotonic() - t0:.1f}s")
    assert loss <= 1.10 * dp and loss <= 0.8 * single
    # §1.7: the ring sends 2(N-1)/N of the fp32 payload (up to one element per chunk: 4 chunks, 2 hops)
    n_params = sum(p.numel() for p in student().parameters())
    assert abs(stats.tx_bytes - 2 * 3 / 4 * 4 * n_params) <= 4 * 2 * 4
    assert stats.world_size == 4 and stats.attempts == 1


@pytest.mark.slow
def test_t4_full_length(master):
    loss, *_ = diloco_run(master, 4, 2000, 25, inner=lambda m: torch.optim.Adam(m.parameters(), 3e-3, (0.9, 0.95)))
    dp, single = train_plain(2000, 128), train_plain(2000, 32)
    print(f"T4 full: DiLoCo {loss:.4f} DP {dp:.4f} single {single:.4f}")
    assert loss <= 1.10 * dp and loss <= 0.8 * single


@pytest.mark.slow
def test_a2_async_sgd_learns_close_to_sync(master):
    # ALGORITHMS §7 A2 at the spec's length (toy: 0.0202 vs 0.0186); at 400 steps / H=10 it
    # measured 1.05 here (numpy toy 1.12), but two 4-peer runs cost ~25 s on a loaded VM
    steps, h = 2000, 25
    sync_loss, *_ = diloco_run(master, 4, steps, h, outer_lr=0.7, outer_momentum=0.0)
    async_loss, _, stats, _ = diloco_run(master, 4, steps, h, outer_lr=0.7, outer_momentum=0.0, delayed=True)
    print(f"A2 ({steps} steps, H={h}, SGD(0.7, 0)): async {async_loss:.4f} sync {sync_loss:.4f} "
          f"ratio {async_loss / sync_loss:.3f}")
    assert async_loss <= 1.2 * sync_loss
    assert stats.world_size == 4


def _join_run(master, delayed, steps=160, sync_every=10, join_after=2):
    """3 veterans; a 4th peer connects once veteran 0 passed ``join_after`` outer steps."""
    kw = dict(outer_lr=0.7, outer_momentum=0.0 if delayed else 0.9, delayed=delayed)
    comms = group(master, 3)
    records: list[dict] = [{} for _ in range(4)]
    losses: list[list] = [[] for _ in range(4)]
    started = threading.Event()
    joiner_box: dict = {}

    def record(m):
        def hook(opt):
            if opt.outer_step not in records[m]:
                records[m][opt.outer_step] = opt.theta_digest()
            if m == 0 and opt.outer_step >= join_after and not started.is_set():
                started.set()
        return hook

    def veteran(m):
        model = student()
        opt = DiLoCo(model, adam(model), comms[m], sync_every=sync_every, **kw)
        losses[m] = run_steps(model, opt, dataset(100 + m, steps), on_step=record(m))
        opt.finish()
        return eval_loss(model), opt.theta_digest(), comms[m].world_size

    def joiner():
        assert started.wait(120)
        comm = pccl.Communicator(master.address, connections=1)
        joiner_box["comm"] = comm
        comm.connect()
        model = student(seed=42)  # a different init: everything must come from the group
        opt = DiLoCo(model, adam(model), comm, sync_every=sync_every, **kw)
        start = opt.global_step
        joiner_box.update(start=start, first=(opt.outer_step, opt.theta_digest()))
        records[3][opt.outer_step] = opt.theta_digest()
        losses[3] = run_steps(model, opt, dataset(103, steps)[start:], on_step=record(3))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        opt.finish()
        return eval_loss(model), opt.theta_digest(), comm.world_size

    try:
        out, err = together([lambda m=m: veteran(m) for m in range(3)] + [joiner], timeout=300)
    finally:
        close_all(comms + ([joiner_box["comm"]] if "comm" in joiner_box else []))
    assert err == [None] * 4, err
    return out, records, losses, joiner_box


def test_t6_a_peer_joins_at_an_outer_boundary_and_trains_on(master):
    out, records, losses, box = _join_run(master, delayed=False)
    t_join, digest = box["first"]
    assert 2 <= t_join < 16 and box["start"] == t_join * 10
    assert all(records[m][t_join] == digest for m in range(3))  # the joiner got θᵍ, b with matching hash
    assert len({o[1] for o in out}) == 1 and all(o[2] == 4 for o in out)  # identical θᵍ‖b, world of 4
    for s in records[3]:
        assert all(records[m][s] == records[3][s] for m in range(3))
    j = losses[3]
    assert np.mean(j[-10:]) < np.mean(j[:10])  # the joiner's training loss keeps decreasing
    print(f"T6: joined at outer step {t_join}; final test loss {out[0][0]:.4f}; joiner loss "
          f"{np.mean(j[:10]):.4f} -> {np.mean(j[-10:]):.4f}")


def test_a4_async_join_receives_the_post_update_theta_in_the_second_sync(master):
    out, records, losses, box = _join_run(master, delayed=True)
    t_join, digest = box["first"]
    assert t_join >= 1
    assert all(records[m][t_join] == digest for m in range(3))  # first sync: s_k
    after = min(s for s in records[3] if s > t_join)  # after the second (receive-only) sync: s_{k+1}
    assert after == t_join + 1 and all(records[m][after] == records[3][after] for m in range(3))
    assert len({o[1] for o in out}) == 1 and all(o[2] == 4 for o in out)
    assert all(math.isfinite(o[0]) for o in out)
    j = losses[3]
    assert np.mean(j[-10:]) < np.mean(j[:10])
    print(f"A4: joined at outer step {t_join}; final test loss {out[0][0]:.4f}")

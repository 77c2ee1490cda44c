"""Shared-seed SPSA (MeZO, "Just One Byte"): zeroth-order training that sends one byte per sample.

How it works (docs/ALGORITHMS.md §4; one step t, every peer of the group)
1. Membership (§4.5). The parameters, the step counter ``spsa/step`` and the codec reference
   ``spsa/ref`` are keys of a :class:`pccl.SharedState`. On its first step every peer syncs it
   (a joiner receives θ and t from the group); when ``comm.are_peers_pending()`` the peers call
   ``update_topology()`` and sync again. A failed collective (``pccl.RETRYABLE``) is followed by
   ``update_topology()``, a sync, and a redo of the step's exchange (at most ``max_retries``).
2. Probe. For each sample j this peer draws z from seed(run, t, peer id, j) (step 5) and evaluates
   L+ = L(θ+εz), L− = L(θ−εz) with the user's closure, g = (L+ − L−)/(2ε). θ is restored from a
   copy of its bytes, never by subtracting εz again (a float round trip is not exact, §8 item 7).
3. Codec (§4.3). g becomes one signed byte b = sign(g)·clamp(round(8·ln(|g|/r_t)) + 64, 1, 127),
   b = 0 for g = 0 or non-finite; decode is r_t·T[|b|] with T a frozen float32 table (SHA-256
   checked at import), so no peer calls exp() on received data.
4. Exchange (wire format). An all-reduce cannot concatenate, so every peer writes its K = samples
   bytes into its rank's slot of a zero int8 buffer of world_size·K and the group SUM-reduces it:
   each slot has exactly one non-zero writer, so the sum *is* the gather (no wrap-around, exact).
   Slot r·K + j holds sample j of ``comm.topology[r]``. Payload: K bytes per peer per step; the
   ring moves about 2(N−1)·K bytes per peer (``last_exchange``).
5. Update. Every peer decodes every slot identically and applies, sorted by (peer id, sample),
   θ ← θ − (lr/n)·Σ ĝ·z (n = world_size·K, or √n with ``normalize="sqrt"``). Per tensor the sum
   is accumulated in float64 as one exact ±c term per contribution (z is ±1; no fused
   multiply-add), cast once to the parameter dtype and added: the same IEEE operations in the
   same order on every peer, so θ stays bit-identical. r_{t+1} = lower median of the decoded |ĝ|.
   Even the prober uses its decoded ĝ, never its raw g.
Generator (§4.4): seed(run, t, i, j) = BLAKE2b-64 (personal "pccl-spsa-seed") of the four
little-endian uint64; the key of tensor k is BLAKE2b-64 (personal "pccl-spsa-tensor") of (seed, k);
its signs are the bits (LSB first) of the little-endian words SplitMix64(key + (c+1)·γ),
c = 0, 1, …: pure uint64 integer arithmetic, identical on every platform and independent of call
order (counter based), unlike torch/numpy Generators (§8 item 8).

The user's duties: the closure must evaluate the *same* minibatch on every call of one step and
be deterministic (dropout off: ``model.eval()``); every peer must use the same model
architecture, ``samples``, ``eps``, ``lr``, ``normalize`` and ``run_seed``. The stable step size
shrinks like 1/d (E‖g z‖² ≈ d‖∇L‖² for Rademacher z): start near 1e-3·(100/d) on fresh models;
with n contributions per step the mean's variance drops by n, which allows about n× the step.
"""
from __future__ import annotations

import hashlib
import logging
import math
import struct
from typing import Any, Callable, Iterable

import numpy as np

from pccl.enums import ReduceOp
from pccl.errors import RETRYABLE, InvalidUsage
from pccl.shared_state import SharedState

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
# 0-d uint64 arrays (numpy scalars of uint64 take a slow conversion path in mixed arithmetic)
_GAMMA, _M1, _M2 = (np.array(v, np.uint64) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_S30, _S27, _S31 = (np.array(v, np.uint64) for v in (30, 27, 31))

#: T[m] = float32(exp((m − 64)/8)) for m = 1..127, T[0] = 0; frozen by its SHA-256 below.
CODE_TABLE = np.exp((np.arange(128) - 64) / 8.0).astype(np.float32)
CODE_TABLE[0] = 0.0
CODE_TABLE_SHA256 = "2b04e3c1fd8a848fb57da27abbf8c431fc52cfa1b7d6b417d9c880bfa1aaa9bf"
if hashlib.sha256(CODE_TABLE.astype("<f4").tobytes()).hexdigest() != CODE_TABLE_SHA256:
    raise ImportError("pccl.optim.spsa: this platform's exp() built a different codec table; peers would "
                      "decode the same byte differently (freeze the table as constants)")
# decoded unit value of every byte 0..255 read as int8; -128 is never emitted and decodes to 0
_UNIT = np.zeros(256, np.float64)
for _b in range(-127, 128):
    _UNIT[_b & 0xFF] = math.copysign(float(CODE_TABLE[abs(_b)]), _b)


# ----------------------------------------------------------------------------- seeds and signs
def _u64(x: int, what: str) -> int:
    if type(x) is not int or not 0 <= x <= _U64:
        raise InvalidUsage(f"{what} must be an int in [0, 2**64), got {x!r}")
    return x


def seed_for(run_seed: int, step: int, peer: int, sample: int) -> int:
    """seed(run, t, i, j): the first 8 bytes (little-endian) of BLAKE2b over the four uint64."""
    data = struct.pack("<4Q", *(_u64(v, n) for v, n in ((run_seed, "run_seed"), (step, "step"),
                                                          (peer, "peer"), (sample, "sample"))))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"pccl-spsa-seed").digest(), "little")


def tensor_key(seed: int, tensor_index: int) -> int:
    """The generator key of tensor ``tensor_index`` (fixed parameter order) for one seed."""
    data = struct.pack("<2Q", _u64(seed, "seed"), _u64(tensor_index, "tensor_index"))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"pccl-spsa-tensor").digest(), "little")


def _splitmix(states: np.ndarray) -> np.ndarray:
    z = states  # uint64 array arithmetic wraps modulo 2**64
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def rademacher_many(keys: Iterable[int], n: int) -> np.ndarray:
    """int8 signs ±1 of shape (len(keys), n): bit b of word c of key k gives element 64c + b
    (bit 1 ⇒ −1); word c = SplitMix64(key + (c + 1)·γ)."""
    k = np.array([_u64(int(x), "key") for x in keys], np.uint64).reshape(-1, 1)
    words = (n + 63) // 64
    states = k + (np.arange(1, words + 1, dtype=np.uint64) * _GAMMA)[None, :]
    raw = _splitmix(states).astype("<u8", copy=False).reshape(-1).view(np.uint8)
    bits = np.unpackbits(raw, bitorder="little").reshape(len(k), words * 64)[:, :n].view(np.int8)
    return 1 - (bits << 1)  # int8: bit 0 → +1, bit 1 → −1


def rademacher(key: int, n: int) -> np.ndarray:
    """int8 signs ±1 of one tensor of ``n`` elements (see :func:`rademacher_many`)."""
    return rademacher_many([key], n)[0]


def perturbation(run_seed: int, step: int, peer: int, sample: int, sizes: Iterable[int]) -> list[np.ndarray]:
    """z for seed (t, i, j), one int8 ±1 array per parameter tensor (sizes in parameter order)."""
    seed = seed_for(run_seed, step, peer, sample)
    return [rademacher(tensor_key(seed, k), int(n)) for k, n in enumerate(sizes)]


# ----------------------------------------------------------------------------- one-byte codec
def encode(g: Any, ref: float) -> np.ndarray:
    """g → int8 codes: sign(g)·clamp(round(8·ln(|g|/ref)) + 64, 1, 127); 0 for 0 or non-finite."""
    g = np.asarray(g, np.float64)
    mag = np.abs(g)
    ok = (mag > 0) & (mag < math.inf)  # NaN compares false
    m = np.round(8.0 * (np.log(np.where(ok, mag, 1.0)) - math.log(ref))) + 64.0  # no overflow, no warnings
    return np.where(ok, np.sign(g) * np.clip(m, 1.0, 127.0), 0.0).astype(np.int8)


def decode(codes: Any, ref: float) -> np.ndarray:
    """int8 codes → float64 ĝ = ref·T[|b|]·sign(b) (table lookup; identical on every platform)."""
    codes = np.ascontiguousarray(codes, dtype=np.int8)
    return float(ref) * _UNIT[codes.view(np.uint8)]


def next_ref(decoded: Any, ref: float) -> float:
    """r_{t+1}: the lower median of the non-zero decoded |ĝ| of step t (unchanged if none)."""
    mag = np.sort(np.abs(np.asarray(decoded, np.float64)[np.asarray(decoded) != 0]))
    if mag.size == 0:
        return float(ref)
    r = float(mag[(mag.size - 1) // 2])
    return r if 0.0 < r < math.inf else float(ref)


# ----------------------------------------------------------------------------- the update
def update_deltas(sizes: Iterable[int], run_seed: int, step: int,
                  contributions: Iterable[tuple[int, int, float]], scale: float) -> list[np.ndarray]:
    """Σ −scale·ĝ·z over (peer, sample, ĝ) sorted by (peer, sample), per tensor, float64.

    Each contribution adds the exact term ±c (c = −scale·ĝ rounded once) element by element, in
    the same order on every peer: no transcendental, no fused operation, no data-dependent order.
    """
    out = [np.zeros(int(n), np.float64) for n in sizes]
    terms = [(seed_for(run_seed, step, peer, sample), -scale * float(ghat))
             for peer, sample, ghat in sorted(contributions) if ghat != 0.0]
    for k, acc in enumerate(out):
        per = max(1, (1 << 24) // max(1, acc.size))  # signs of several contributions per call, ≤ 16 MiB
        for lo in range(0, len(terms), per):
            batch = terms[lo:lo + per]
            signs = rademacher_many([tensor_key(seed, k) for seed, _ in batch], acc.size)
            for (_, c), z in zip(batch, signs, strict=True):
                acc += c * z  # c·(±1) is exact; then one IEEE add per element, in sorted order
    return out


# ----------------------------------------------------------------------------- the optimizer
class SharedSeedSPSA:
    """``SharedSeedSPSA(model, comm, eps=1e-3, lr=1e-6, samples=1, run_seed=0)``; ``step(closure)``.

    ``comm`` is a connected :class:`pccl.Communicator` (None: a single local machine, peer id 0).
    The trainable parameters (``requires_grad``, registration order) are perturbed and updated in
    place and held by reference: move the model to its device before building the optimizer.
    ``normalize`` is "mean" (divide the summed update by n = world_size·samples) or "sqrt" (√n,
    as in the original Just-One-Byte code). ``state`` is the :class:`pccl.SharedState` it syncs.

    Attributes after each step: ``payload_bytes`` (bytes this peer contributes: one per sample),
    ``last_exchange`` (the ``ReduceInfo`` of the gather: ``tx_bytes``/``rx_bytes`` on the wire),
    ``last_buffer_bytes`` (world_size·samples), ``last_g`` (this peer's raw g), ``last_sync``
    (``SyncInfo`` of the last sync, or None), ``sync_tx_bytes`` / ``sync_rx_bytes`` (shared-state
    bytes served / received so far), ``retries`` (failed attempts so far).
    """

    def __init__(self, model: Any, comm: Any = None, eps: float = 1e-3, lr: float = 1e-6, samples: int = 1,
                 run_seed: int = 0, normalize: str = "mean", max_retries: int = 8, tag: int = 0) -> None:
        if not (eps > 0 and math.isfinite(eps)) or not (lr >= 0 and math.isfinite(lr)):
            raise InvalidUsage(f"eps must be > 0 and lr >= 0 (finite), got eps={eps!r}, lr={lr!r}")
        if type(samples) is not int or samples < 1:
            raise InvalidUsage(f"samples must be an int >= 1, got {samples!r}")
        if normalize not in ("mean", "sqrt"):
            raise InvalidUsage(f"normalize must be 'mean' or 'sqrt', got {normalize!r}")
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise InvalidUsage("the model has no trainable parameters")
        for n, p in self.named:
            if p.device.type not in ("cpu", "cuda") or not p.is_contiguous():
                raise InvalidUsage(f"parameter {n!r} must be a contiguous CPU or CUDA tensor")
        self.params = [p for _, p in self.named]
        self.sizes = [p.numel() for p in self.params]
        self.comm, self.eps, self.lr, self.samples = comm, float(eps), float(lr), samples
        self.run_seed, self.normalize, self.max_retries, self.tag = _u64(run_seed, "run_seed"), normalize, \
            max_retries, tag
        self._step = np.zeros(1, np.int64)
        self._ref = np.ones(1, np.float64)
        self.state = SharedState({**{n: p for n, p in self.named}, "spsa/step": self._step, "spsa/ref": self._ref})
        self.payload_bytes = samples
        self.last_exchange: Any = None
        self.last_buffer_bytes = 0
        self.last_sync: Any = None
        self.sync_tx_bytes = self.sync_rx_bytes = 0
        self.last_g = np.zeros(samples)
        self.retries = 0

    @property
    def step_count(self) -> int:
        """Steps applied so far by the group (shared: a joiner adopts it)."""
        return int(self._step[0])

    @property
    def ref(self) -> float:
        return float(self._ref[0])

    def _peer(self) -> int:
        return 0 if self.comm is None else self.comm.peer_id

    # -------------------------------------------------------------- membership
    def _sync(self) -> bool:
        """Sync the shared state; True when this peer received bytes (θ or t may have changed)."""
        st = self.state
        if st.synced_revision is not None:
            st.revision = st.synced_revision + 1
        self.last_sync = info = self.comm.sync_shared_state(st)
        self.sync_tx_bytes += info.tx_bytes
        self.sync_rx_bytes += info.rx_bytes
        return info.rx_bytes > 0

    def _membership(self, failed: bool) -> bool:
        comm, changed = self.comm, False
        if failed:
            comm.update_topology()
            return self._sync()
        if self.state.synced_revision is None:
            changed = self._sync()
        if comm.are_peers_pending():
            comm.update_topology()
            changed = self._sync() or changed
        return changed

    # -------------------------------------------------------------- probe / exchange / update
    def probe(self, closure: Callable[[], Any]) -> np.ndarray:
        """This peer's raw projected gradients g_j, j < samples, at the current θ and step.

        θ is restored to its exact pre-probe bytes afterwards (also when the closure raises).
        """
        return self._probe(closure)[0]

    def _probe(self, closure: Callable[[], Any]) -> tuple[np.ndarray, list[float]]:
        import torch

        step, peer = self.step_count, self._peer()
        backup = [p.detach().clone() for p in self.params]
        g, mid = np.zeros(self.samples), []
        try:
            with torch.no_grad():
                for j in range(self.samples):
                    signs = perturbation(self.run_seed, step, peer, j, self.sizes)
                    zs = [torch.from_numpy(z).to(device=p.device, dtype=p.dtype).view_as(p) * self.eps
                          for z, p in zip(signs, self.params, strict=True)]
                    loss = []
                    for sign in (1, -1):
                        for p, b, z in zip(self.params, backup, zs, strict=True):
                            p.copy_(b)
                            if sign > 0:
                                p.add_(z)
                            else:
                                p.sub_(z)
                        loss.append(float(closure()))
                    g[j] = (loss[0] - loss[1]) / (2.0 * self.eps)
                    mid.append(0.5 * (loss[0] + loss[1]))
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)
        return g, mid

    def _exchange(self, codes: np.ndarray) -> list[tuple[int, int, int]]:
        k = self.samples
        if self.comm is None:
            self.last_buffer_bytes = k
            return [(0, j, int(codes[j])) for j in range(k)]
        comm = self.comm
        ids, rank = comm.topology, comm.rank
        buf = np.zeros(len(ids) * k, np.int8)
        buf[rank * k:(rank + 1) * k] = codes
        self.last_buffer_bytes = buf.nbytes
        self.last_exchange = comm.all_reduce(buf, op=ReduceOp.SUM, tag=self.tag)
        return [(int(ids[r]), j, int(buf[r * k + j])) for r in range(len(ids)) for j in range(k)]

    def step(self, closure: Callable[[], Any]) -> float:
        """One SPSA step of the whole group; returns this peer's mean (L+ + L−)/2 of the step.

        Raises what the communicator raises once ``max_retries`` retryable failures in a row are
        exhausted (then θ and the step counter are unchanged), InvalidUsage (arguments that differ
        across peers), and whatever the closure raises (θ is restored first).
        """
        import torch

        g: np.ndarray | None = None
        failed, losses = False, [math.nan]
        for attempt in range(self.max_retries + 1):
            try:
                if self.comm is not None and self._membership(failed):
                    g = None  # this peer received θ or t: its probe is stale
                if g is None:
                    g, losses = self._probe(closure)
                contributions = self._exchange(encode(g, self.ref))
                break
            except RETRYABLE as exc:
                self.retries += 1
                failed = True
                log.info("peer %s step %d: %s (attempt %d)", self._peer(), self.step_count, exc, attempt + 1)
                if attempt == self.max_retries:
                    raise
        self.last_g = g
        step, ref = self.step_count, self.ref
        ghat = decode(np.array([c for _, _, c in contributions], np.int8), ref)
        n = len(contributions)
        scale = self.lr / (n if self.normalize == "mean" else math.sqrt(n))
        deltas = update_deltas(self.sizes, self.run_seed, step,
                               [(i, j, float(v)) for (i, j, _), v in zip(contributions, ghat, strict=True)], scale)
        with torch.no_grad():
            for p, d in zip(self.params, deltas, strict=True):
                p.add_(torch.from_numpy(d).to(device=p.device, dtype=p.dtype).view_as(p))
        self._step[0] = step + 1
        self._ref[0] = next_ref(ghat, ref)
        return float(np.mean(losses))

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's own state (θ is in ``model.state_dict()``)."""
        return {"step": self.step_count, "ref": self.ref, "run_seed": self.run_seed, "eps": self.eps,
                "lr": self.lr, "samples": self.samples, "normalize": self.normalize}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (load it on every peer, or the group's vote decides)."""
        if int(sd["samples"]) != self.samples:
            raise InvalidUsage(f"checkpoint has samples={sd['samples']}, this optimizer {self.samples}")
        self._step[0] = int(sd["step"])
        self._ref[0] = float(sd["ref"])
        self.run_seed = _u64(int(sd["run_seed"]), "run_seed")
        self.eps, self.lr, self.normalize = float(sd["eps"]), float(sd["lr"]), str(sd["normalize"])

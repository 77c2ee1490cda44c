"""Coalescing for ``Communicator.all_reduce_many``: small tensors share one collective (a bucket).

Why: every collective pays a fixed protocol cost (two master round trips and several thread
hand-offs, tens of milliseconds on a loaded 2-core host, docs/benchmarks.md) whatever its size, so
a list of small tensors reduced one op each is bound by that cost, not by the bytes.

How it works
1. :func:`plan` (pure) groups list positions into buckets: a tensor of ``cap`` bytes or more, or of
   a kind that may not be coalesced, is a bucket of its own; the others join the open bucket of
   their kind (the dtype) until the next one would pass ``cap``. Buckets are ordered by their
   first position. Peers that pass the same list (same sizes and dtypes, as all_reduce_many
   requires) make the same buckets and issue the same collectives in the same order. Whether they
   did is checked: each collective's announcement carries :func:`layout_digest` of the whole list
   (the master refuses an op whose peers disagree, InvalidUsage), and all_reduce_many starts no
   other collective before the master commenced its first one (one master round trip). So peers
   with different lists fail at once, instead of issuing different numbers of collectives that
   would wait for partners until their deadline.
2. :class:`Bucket` gathers its tensors into one private input buffer and reduces it out of place
   into a second one, so the user's tensors are not touched until the collective committed:
   :meth:`Bucket.scatter` then copies each tensor's slice back (through the tensor's writeback
   when it is staged: CUDA or bfloat16). A failed collective leaves every tensor of its bucket
   unchanged, so a retry is always safe. Read-only and unsupported tensors are refused before the
   bucket's collective starts, so the copy back cannot fail on them.
3. A tensor may appear only once in the list (all_reduce_many checks the first bytes' addresses):
   one op per tensor would reduce a repeated tensor once per appearance, a bucket only once.
4. Element-wise, a bucket's result is an all-reduce of the same values as one op per tensor would
   reduce, and bit-identical on every peer (DESIGN.md §4). Only the place of an element in the
   ring's chunks changes, hence possibly the order of a SUM's additions, so the last bit may differ
   from the one-op-per-tensor result (both are valid all-reduces). A bucket's tensors share its
   ReduceInfo (summing ``tx_bytes`` over the list counts a bucket once per tensor). ``cap`` counts
   the user's bytes; bfloat16 tensors are staged as float32, so their bucket is up to 2x ``cap``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Hashable

import numpy as np

from pccl import tensors as tensors_mod
from pccl.errors import InvalidUsage


def describe(x: Any) -> tuple[int, str, int]:
    """(bytes, dtype name, address of the first byte) of a numpy array or torch tensor, without
    staging it; (0, "", 0) for anything else (all_reduce rejects it when its bucket starts)."""
    if isinstance(x, np.ndarray):
        return int(x.nbytes), x.dtype.name, int(x.__array_interface__["data"][0])
    if tensors_mod.is_torch(x):
        return int(x.numel()) * int(x.element_size()), str(x.dtype).replace("torch.", ""), int(x.data_ptr())
    return 0, "", 0


def layout_digest(layout: list[tuple[int, str]], cap: int) -> str:
    """A short digest of a list's (bytes, dtype) layout and the bucket cap: peers whose lists
    differ get different digests, so the master refuses their first collective (InvalidUsage)
    before their bucket plans can send them different numbers of collectives."""
    return hashlib.blake2b(repr((cap, layout)).encode(), digest_size=8).hexdigest()


def plan(sizes: list[int], kinds: list[Hashable | None], cap: int) -> list[list[int]]:
    """Buckets of list positions. ``kinds[i]`` None: position i may not be coalesced. ``cap`` 0:
    one bucket per position."""
    if len(sizes) != len(kinds):
        raise ValueError("sizes and kinds differ in length")
    done: list[list[int]] = []
    open_: dict[Hashable, tuple[list[int], int]] = {}
    for i, (size, kind) in enumerate(zip(sizes, kinds)):
        if kind is None or cap <= 0 or size >= cap:
            done.append([i])
            continue
        members, total = open_.get(kind, ([], 0))
        if members and total + size > cap:
            done.append(members)
            members, total = [], 0
        members.append(i)
        open_[kind] = (members, total + size)
    done.extend(members for members, _ in open_.values())
    done.sort(key=lambda b: b[0])
    return done


class Bucket:
    """Several tensors reduced as one: private input and output buffers, results scattered back."""

    def __init__(self, items: list[Any], names: list[str]) -> None:
        """``items``: the tensors (one dtype); ``names`` say which list positions they are, for errors.
        Raises InvalidUsage for a tensor all_reduce would refuse in place (unsupported, read-only)."""
        self.buffers = [tensors_mod.wrap(x, name) for x, name in zip(items, names)]
        for b, name in zip(self.buffers, names):
            if b.writeback is None and not b.array.flags.writeable:
                raise InvalidUsage(f"{name}: the array is read-only")
        dtypes = {b.array.dtype for b in self.buffers}
        if len(dtypes) != 1:  # plan() groups by dtype name, and wrap() keeps it (bfloat16: float32)
            raise InvalidUsage(f"{', '.join(names)}: one bucket cannot hold dtypes {sorted(map(str, dtypes))}")
        self.src = np.concatenate([b.array for b in self.buffers])
        self.dst = np.empty_like(self.src)

    def scatter(self) -> None:
        """Copy each tensor's slice of the committed result into the tensor."""
        at = 0
        for b in self.buffers:
            part = self.dst[at:at + b.array.size]
            at += b.array.size
            if b.writeback is not None:
                b.writeback(part)
            else:
                np.copyto(b.array, part)

"""Coalescing for ``Communicator.all_reduce_many``: small tensors share one collective (a bucket).

Why: every collective pays a fixed protocol cost (two master round trips and several thread
hand-offs, tens of milliseconds on a loaded 2-core host, docs/benchmarks.md) whatever its size, so
a list of small tensors reduced one op each is bound by that cost, not by the bytes.

How it works
1. :func:`plan` (pure) groups list positions into buckets: a tensor of ``cap`` bytes or more, or of
   a kind that may not be coalesced, is a bucket of its own; the others join the open bucket of
   their kind (the dtype) until the next one would pass ``cap``. Buckets are ordered by their
   first position. Every peer passes the same list (same sizes and dtypes, as all_reduce_many
   requires), so every peer makes the same buckets and issues the same collectives in the same
   order.
2. :class:`Bucket` gathers its tensors into one private input buffer and reduces it out of place
   into a second one, so the user's tensors are not touched until the collective committed:
   :meth:`Bucket.scatter` then copies each tensor's slice back (through the tensor's writeback
   when it is staged: CUDA or bfloat16). A failed bucket leaves every tensor unchanged, so a retry
   is always safe.
3. Element-wise, a bucket's result is an all-reduce of the same values as one op per tensor would
   reduce, and bit-identical on every peer (DESIGN.md §4). Only the place of an element in the
   ring's chunks changes, hence possibly the order of a SUM's additions, so the last bit may differ
   from the one-op-per-tensor result (both are valid all-reduces).
"""
from __future__ import annotations

from typing import Any, Hashable

import numpy as np

from pccl import tensors as tensors_mod


def nbytes_and_kind(x: Any) -> tuple[int, str]:
    """Size in bytes and dtype name of a numpy array or torch tensor, without staging it."""
    if isinstance(x, np.ndarray):
        return int(x.nbytes), x.dtype.name
    if tensors_mod.is_torch(x):
        return int(x.numel()) * int(x.element_size()), str(x.dtype).replace("torch.", "")
    return 0, ""  # not a tensor: all_reduce rejects it with InvalidUsage when its bucket starts


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
        Raises InvalidUsage for an unsupported tensor, as all_reduce would."""
        self.buffers = [tensors_mod.wrap(x, name) for x, name in zip(items, names)]
        dtypes = {b.array.dtype for b in self.buffers}
        if len(dtypes) != 1:  # plan() groups by dtype; staged tensors keep theirs except bfloat16
            raise ValueError(f"a bucket mixes dtypes {sorted(map(str, dtypes))}")
        self.src = np.concatenate([b.array for b in self.buffers]) if self.buffers else np.empty(0)
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

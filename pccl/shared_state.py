"""Shared state: named tensors kept bit-identical on every peer, and their hashes.

How it works
1. ``SharedState({"name": array_or_tensor, ...}, revision=0, allow_content_inequality=...)`` holds
   references to the user's buffers (never copies). Keys are synced in sorted name order.
2. Each key is seen as a flat byte view of the user's memory: numpy arrays and CPU torch tensors
   (bfloat16 included) zero-copy; CUDA tensors through a host copy that is written back only when
   the key was received.
3. Each key's content is hashed with XXH3-128 (the ``xxhash`` package). Measured on this VM on
   256 MiB: XXH3-128 9.2 GB/s, BLAKE3 1.3 GB/s (2.6 multi-threaded), CRC32 1.0, SHA-256 0.29,
   BLAKE2b 0.19 (docs/benchmarks.md). 128 bits make an accidental collision negligible; the hash
   detects divergence, it is not a defence against a malicious peer (that is what HMAC
   authentication of connections is for), so a cryptographic hash would only cost time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import xxhash

from pccl import tensors
from pccl.errors import InvalidUsage

DIGEST_SIZE = 16


def digest(view: np.ndarray) -> bytes:
    """XXH3-128 of a contiguous byte view."""
    return xxhash.xxh3_128_digest(memoryview(view))


@dataclass
class KeyView:
    """One key as flat bytes: ``data`` is the user's memory or a host copy (then ``writeback``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, contiguous
    writeback: Callable[[], None] | None
    allow_inequality: bool

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def _byte_view(x: Any, name: str) -> tuple[np.ndarray, str, tuple[int, ...], Callable[[], None] | None]:
    if isinstance(x, np.ndarray):
        buf = tensors.wrap(x, f"shared state key {name!r}")
        if not x.flags.writeable:
            raise InvalidUsage(f"shared state key {name!r}: the array is read-only")
        return buf.array.view(np.uint8), buf.dtype, buf.shape, None
    if tensors.is_torch(x):
        dtype = str(x.dtype).replace("torch.", "")
        if dtype not in tensors.SUPPORTED:
            raise InvalidUsage(f"shared state key {name!r}: dtype {dtype} is not supported")
        if not x.is_contiguous():
            raise InvalidUsage(f"shared state key {name!r}: the tensor must be contiguous")
        import torch  # a torch tensor was passed, so torch is already imported

        t = x.detach()
        flat = t.reshape(-1).view(torch.uint8)
        if t.device.type == "cpu":
            return flat.numpy(), dtype, tuple(x.shape), None
        host = flat.cpu()
        data = host.numpy()

        def writeback(_t=t, _host=host) -> None:
            _t.reshape(-1).view(torch.uint8).copy_(_host)

        return data, dtype, tuple(x.shape), writeback
    raise InvalidUsage(f"shared state key {name!r}: expected a numpy array or a torch tensor, "
                       f"got {type(x).__name__}")


class SharedState:
    """Named tensors that ``Communicator.sync_shared_state`` keeps identical on every peer.

    ``revision`` must go up by exactly one before every sync after the first (the first may start
    at any revision, e.g. when resuming from a checkpoint); peers that receive the state adopt
    the group's revision. Keys named in ``allow_content_inequality`` may differ between peers
    that are in step; they are sent only to peers whose revision differs (e.g. joiners).
    """

    def __init__(self, tensors_: Mapping[str, Any], revision: int = 0,
                 allow_content_inequality: Iterable[str] = ()) -> None:
        if not isinstance(tensors_, Mapping) or not tensors_:
            raise InvalidUsage("SharedState needs a non-empty mapping of name -> array or tensor")
        for k in tensors_:
            if not isinstance(k, str) or not k:
                raise InvalidUsage(f"shared state keys must be non-empty strings, got {k!r}")
        if type(revision) is not int or revision < 0:
            raise InvalidUsage("revision must be a non-negative int")
        unequal = set(allow_content_inequality)
        unknown = unequal - set(tensors_)
        if unknown:
            raise InvalidUsage(f"allow_content_inequality names unknown keys {sorted(unknown)}")
        self.tensors = dict(tensors_)
        self.revision = revision
        self.allow_content_inequality = frozenset(unequal)
        #: the revision of this object's last successful sync (None: never synced)
        self.synced_revision: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self.tensors[key]

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def views(self) -> list[KeyView]:
        """Flat byte views of every key, in sorted name order."""
        out = []
        for name in self.keys():
            data, dtype, shape, wb = _byte_view(self.tensors[name], name)
            out.append(KeyView(name, dtype, shape, data, wb, name in self.allow_content_inequality))
        return out

    def hashes(self) -> dict[str, bytes]:
        return {v.name: digest(v.data) for v in self.views()}

    def __repr__(self) -> str:
        return f"SharedState(revision {self.revision}, keys {self.keys()})"


@dataclass(frozen=True)
class SyncInfo:
    """What one ``sync_shared_state`` did: payload bytes served and received, the adopted revision."""

    tx_bytes: int
    rx_bytes: int
    revision: int

"""Adapters between user buffers (numpy arrays, torch tensors) and flat numpy views.

torch is never imported here: a torch tensor is recognised by its type's module, and only its
own methods are called. CUDA tensors are staged through host memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pccl.errors import InvalidUsage

#: dtypes reduced natively (wire and accumulation in the same dtype)
NATIVE = {"float32", "float64", "int8", "int16", "int32", "int64", "uint8"}
#: 16-bit floats: reduced in float32, cast back once at the end on every peer
WIDENED = {"float16", "bfloat16"}
SUPPORTED = NATIVE | WIDENED


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


@dataclass
class Buffer:
    """A user buffer seen as a flat numpy array.

    ``array`` is a view of the user's memory when ``writeback`` is None; otherwise it is a staged
    copy and ``writeback(result)`` stores a result array into the user's tensor.
    """

    array: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    writeback: Callable[[np.ndarray], None] | None
    identity: tuple[int, int]  # (address, nbytes) of the user's memory, to detect in-place calls


def wrap(x: Any, what: str) -> Buffer:
    """View ``x`` as a flat array. Raises InvalidUsage for unsupported types, dtypes or layouts."""
    if isinstance(x, np.ndarray):
        name = x.dtype.name
        if name not in SUPPORTED:
            raise InvalidUsage(f"{what}: dtype {name} is not supported (use one of {sorted(SUPPORTED)})")
        if not x.dtype.isnative:
            raise InvalidUsage(f"{what}: the array must be in native byte order (use x.astype(x.dtype.newbyteorder('=')))")
        if not x.flags.c_contiguous:
            raise InvalidUsage(f"{what}: the array must be C-contiguous (use np.ascontiguousarray)")
        if not x.flags.writeable and what == "dst":
            raise InvalidUsage("dst: the array is read-only")
        flat = x.reshape(-1)
        return Buffer(flat, name, tuple(x.shape), None, (x.__array_interface__["data"][0], x.nbytes))
    if is_torch(x):
        name = str(x.dtype).replace("torch.", "")
        if name not in SUPPORTED:
            raise InvalidUsage(f"{what}: dtype {name} is not supported (use one of {sorted(SUPPORTED)})")
        if not x.is_contiguous():
            raise InvalidUsage(f"{what}: the tensor must be contiguous (call .contiguous())")
        ident = (x.data_ptr(), x.numel() * x.element_size())
        shape = tuple(x.shape)
        t = x.detach()
        if t.device.type == "cpu" and name != "bfloat16":
            return Buffer(t.reshape(-1).numpy(), name, shape, None, ident)
        # Staged: CUDA tensors go through host memory; bfloat16 has no numpy dtype.
        host = t.reshape(-1).cpu()
        arr = host.float().numpy() if name == "bfloat16" else host.numpy()

        def writeback(result: np.ndarray, _t=t) -> None:
            import torch  # only reached with torch tensors, so torch is already imported

            _t.reshape(-1).copy_(torch.from_numpy(result).to(_t.dtype))

        return Buffer(arr, name, shape, writeback, ident)
    raise InvalidUsage(f"{what}: expected a numpy array or a torch tensor, got {type(x).__name__}")

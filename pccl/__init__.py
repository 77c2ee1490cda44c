"""pccl: a fault-tolerant collective communication runtime for training over ordinary TCP.

    master = pccl.Master("127.0.0.1", port=0).start()
    comm = pccl.Communicator(master=master.address).connect()
    comm.all_reduce(array)            # in place, SUM; see README.md for the full loop

torch is imported only by the modules that need it (``pccl.optim``), never here.
"""
from __future__ import annotations

from pccl.communicator import AllReduceHandle, Communicator, ReduceInfo
from pccl.config import Config
from pccl.enums import Algorithm, Quantization, ReduceOp, SyncStrategy
from pccl.errors import (
    RETRYABLE, Aborted, AuthenticationFailed, InvalidUsage, Kicked, MasterLost, MasterUnreachable, PcclError,
    PcclTimeout, PeerFailure,
    ProtocolError,
)
from pccl.master import Master
from pccl.shared_state import SharedState, SyncInfo

__version__ = "0.1.0"

__all__ = [
    "Aborted", "Algorithm", "AllReduceHandle", "AuthenticationFailed", "Communicator", "Config", "InvalidUsage",
    "Kicked", "Master", "MasterLost", "MasterUnreachable", "PcclError", "PcclTimeout", "PeerFailure", "ProtocolError",
    "Quantization",
    "RETRYABLE", "ReduceInfo", "ReduceOp", "SharedState", "SyncInfo", "SyncStrategy", "__version__",
]

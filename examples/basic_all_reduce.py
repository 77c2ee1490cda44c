"""A minimal fault-tolerant all-reduce loop. Run: pccl launch -n 3 -- examples/basic_all_reduce.py"""
import numpy as np

import pccl

comm = pccl.Communicator()  # master address from PCCL_MASTER
comm.connect()
x = np.full(1 << 20, comm.peer_id, dtype=np.float32)
done = 0
while done < 20:
    if comm.are_peers_pending():
        comm.update_topology()
    buf = x.copy()
    try:
        info = comm.all_reduce(buf, op=pccl.ReduceOp.AVG)
    except pccl.RETRYABLE as exc:  # a peer died or left: rebuild the ring and retry
        print(f"retrying after: {exc}")
        comm.update_topology()
        continue
    done += 1
    print(f"step {done}: world {info.world_size}, mean {buf[0]:.3f}, {info.seconds * 1e3:.1f} ms")
comm.close()

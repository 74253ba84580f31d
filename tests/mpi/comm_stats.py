"""Under ``mpiexec -n 2``: parallel.comm's accounting on real ranks. Rank 1 sleeps LATE
seconds before each operation, so rank 0 is the one blocked: in a blocking all-reduce (on a
group split from the world), in a receive, and in the wait on a non-blocking all-reduce.

Rank 0 prints one JSON line with both ranks' stats.
"""
import json
import time

import numpy as np

import parallel

LATE = 0.3

world = parallel.world_group()
assert world.size == 2, "run me with mpiexec -n 2"
rank = world.rank
pair = world.split(0, rank, "pair")            # the same two ranks, another communicator


def late():
    if rank == 1:
        time.sleep(LATE)


world.barrier()
with parallel.record_comm() as stats:
    a = np.ones(1000, np.float64)                          # 8000 bytes
    late()
    pair.all_reduce(a)
    assert np.all(a == 2)
    big = np.full(2 ** 17, float(rank), np.float64)        # 1 MB
    if rank == 1:
        late()
        world.send(big, dest=0)
    else:
        world.recv(big, source=1)
        assert np.all(big == 1)
    b = np.ones(1000, np.float64)
    late()                                                 # rank 0 starts it at once
    req = world.all_reduce(b, async_op=True)
    req.wait()
    assert np.all(b == 2)
    world.all_reduce(np.ones(1000, np.float64))            # both on time: short for both

mine = json.dumps(stats.as_dict())
if rank == 1:
    world.send(np.frombuffer(mine.encode().ljust(4096), np.uint8).copy(), dest=0)
else:
    buf = np.empty(4096, np.uint8)
    world.recv(buf, source=1)
    other = buf.tobytes().decode().strip()
    print("RESULT " + json.dumps({"late": LATE, "ranks": [json.loads(mine), json.loads(other)]}),
          flush=True)

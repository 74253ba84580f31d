"""Under ``mpiexec -n N``: one rank fails while the others wait in a collective; every rank
must end promptly (the test measures how long) with that rank's message on stderr.

    python abort.py raise    rank 1 raises an uncaught exception (the excepthook's case)
    python abort.py exit     rank 1 calls sys.exit(2) inside abort_on_error() (a CLI's case)
"""
import sys

import numpy as np

import parallel

state = parallel.init_parallel()
world = state.world
if world.rank == 1 and sys.argv[1] == "raise":
    raise ValueError("boom on rank 1")    # uncaught: init_parallel's excepthook
with parallel.abort_on_error():
    if world.rank == 1:
        print("error: a one-line message from rank 1", file=sys.stderr)
        sys.exit(2)
world.all_reduce(np.ones(4))              # the other ranks wait here for rank 1, forever
print(f"rank {world.rank} finished: the failure did not end this rank", flush=True)

"""Under ``mpiexec -n N``: ``tensorlite-gpt prepare ARGS`` through the CLI, every rank reading
its share of the files (chunks made small so that each rank has several). Rank 0 prints
``RESULT`` with meta.json and the ranks' peak memory; the test compares the folder with the
one a single process prepared from the same files."""
import json
import sys
from pathlib import Path

from gpt.cli import main
from gpt.data import stream

stream.CHUNK_BYTES = 6000  # the output does not depend on it: only who reads what

if __name__ == "__main__":
    status = main(["prepare", *sys.argv[1:]])
    from gpt.distributed import mpi_world

    world = mpi_world()
    if status == 0 and world.rank == 0:
        out = Path(sys.argv[sys.argv.index("--out") + 1])
        meta = json.loads((out / "meta.json").read_text())
        report = json.loads((out / "report.json").read_text())
        print("RESULT " + json.dumps({"meta": meta, "ranks": world.size, "processes": report["processes"]}),
              flush=True)
    sys.exit(status)

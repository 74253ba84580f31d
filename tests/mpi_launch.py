"""Launching tests/mpi/ scripts on N real ranks, for the tests of parallel/.

``run_mpi(n, script, *args)`` runs ``mpiexec -n n python tests/mpi/<script> args`` with a
timeout, the ranks in their own process group (so a hang is killed whole and no rank outlives
the test) and this checkout first on PYTHONPATH (whatever an editable install points at).
``result_of`` returns the JSON dict a script's rank 0 printed on its ``RESULT `` line.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi"


def _mpiexec():
    local = Path(sys.executable).parent / "mpiexec"        # the one the mpich wheel installs
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and mpiexec: pip install -e '.[mpi]' (mpi4py and the mpich wheel)")


def run_mpi(n: int, script: str, *args, timeout: float = 90):
    """-> (returncode, stdout, stderr, seconds)."""
    cmd = [MPIEXEC, "-n", str(n), sys.executable, str(SCRIPTS / script), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                 # mpiexec and every rank
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s (a hang)\n{out}\n{err}")
    return proc.returncode, out, err, time.monotonic() - t0


def result_of(n: int, script: str, *args, timeout: float = 90) -> dict:
    rc, out, err, seconds = run_mpi(n, script, *args, timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert rc == 0 and lines, (f"{script} on {n} ranks failed (status {rc}, {seconds:.1f} s):"
                               f"\n{out}\n{err}")
    return json.loads(lines[-1][len("RESULT "):])

import os

import numpy as np
import pytest

import tensorlite as tl

# hypothesis quick on CI (BLAS threads: tensorlite.cpu sizes them; an OMP_NUM_THREADS set
# here would pass to every subprocess and make mpiexec ranks oversubscribe the cores)

try:
    from hypothesis import settings
    settings.register_profile("ci", max_examples=30, deadline=None)
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def run_cli():
    """Run `python -m gpt.cli ARGS` in a fresh process from this checkout (for exits that
    pytest cannot survive in-process: SIGKILL, signals, mpiexec)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]

    def run(args, env=None, timeout=300):
        e = dict(os.environ, PYTHONPATH=str(root))
        e.update(env or {})
        return subprocess.run([sys.executable, "-m", "gpt.cli", *args], env=e,
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed():
    tl.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if tl.cuda_available():
        return
    skip = pytest.mark.skip(reason=f"GPU test skipped: {tl.cuda_unavailable_reason()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA GPU")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    """A small prepared data folder shared by the command-line tests: four files of the
    standard library, the byte tokenizer (read-only for the tests that use it)."""
    import sysconfig
    from pathlib import Path

    from gpt.data.prepare import prepare
    src = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py"):
        (src / name).write_text((stdlib / name).read_text())
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(str(src), out, tokenizer="byte", progress=False)
    return out

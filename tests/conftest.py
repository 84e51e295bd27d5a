"""Test session set-up shared by every test file.

Libraries write caches and telemetry into $HOME (onnxruntime, OpenVINO, matplotlib, torch hub): point
them at a throw-away folder so the tests neither depend on nor pollute the user's home.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="dfineseg-test-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = str(_HOME)
os.environ["XDG_CACHE_HOME"] = str(_HOME / ".cache")
os.environ["MPLCONFIGDIR"] = str(_HOME / ".mpl")
os.environ["MPLBACKEND"] = "Agg"
os.environ["TORCH_HOME"] = str(_HOME / ".torch")
# OpenVINO's and NNCF's telemetry read their consent from $HOME/intel/openvino_telemetry; with no file they
# send events from background threads that fork a process each (and try the network). "0" declines.
(_HOME / "intel").mkdir()
(_HOME / "intel" / "openvino_telemetry").write_text("0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))

# The session-scoped trained model that export, inference, val and bench tests compare against.
import pytest  # noqa: E402
from trained_fixture import trained_run  # noqa: E402,F401


@pytest.fixture
def one_thread():
    """Train on one thread (see trained_fixture.training_threads: two per process oversubscribe 2 cores)."""
    from trained_fixture import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A 4 + 2 image generated dataset for the training tests (64 px runs of the tiny model)."""
    from dfineseg.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("small"), n_train=4, n_val=2, seed=3)


@pytest.fixture(scope="session")
def standin_files(tmp_path_factory):
    """The hand-built stand-in model exported once per session (ONNX, detect, batch 2, OpenVINO)."""
    from test_predictor_standin import build_standin_files

    return build_standin_files(tmp_path_factory.mktemp("standin"))

# .ci/run sets this: each test's id is appended before it runs, so when the interpreter itself dies (a
# native crash ends pytest before it can report) the CI summary can still name the test that was running.
_PROGRESS_LOG = os.environ.get("DFINESEG_TEST_PROGRESS")


def pytest_runtest_logstart(nodeid, location):
    if _PROGRESS_LOG:
        with open(_PROGRESS_LOG, "a", encoding="utf-8") as log:
            log.write(nodeid + "\n")

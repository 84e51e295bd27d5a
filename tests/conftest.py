"""Test session set-up shared by every test file.

Libraries write caches and telemetry into $HOME (onnxruntime, OpenVINO, matplotlib, torch hub): point
them at a throw-away folder so the tests neither depend on nor pollute the user's home.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="dfineseg-test-home-"))
os.environ["HOME"] = str(_HOME)
os.environ["XDG_CACHE_HOME"] = str(_HOME / ".cache")
os.environ["MPLCONFIGDIR"] = str(_HOME / ".mpl")
os.environ["MPLBACKEND"] = "Agg"
os.environ["TORCH_HOME"] = str(_HOME / ".torch")
os.environ["OPENVINO_TELEMETRY_OPT_OUT"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))

# The session-scoped trained model that export, inference, val and bench tests compare against.
from trained_fixture import trained_run  # noqa: E402,F401

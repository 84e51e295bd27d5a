"""Installed names and the CLI surface: what a user touches first."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO_ROOT


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfineseg.cli", *args], capture_output=True, text=True, **kw)


def test_installed_names_import():
    import dfineseg.benchmarks
    import dfineseg.export
    import dfineseg.infer
    import dfineseg.infer.boxes

    # The installed names map onto the repository's top-level folders (setuptools package-dir).
    assert Path(dfineseg.infer.boxes.__file__).resolve() == (REPO_ROOT / "infer" / "boxes.py").resolve()
    assert Path(dfineseg.export.__file__).resolve().parent == (REPO_ROOT / "export").resolve()
    assert Path(dfineseg.benchmarks.__file__).resolve().parent == (REPO_ROOT / "benchmarks").resolve()
    assert dfineseg.export.__name__ == "dfineseg.export"
    assert dfineseg.benchmarks.__name__ == "dfineseg.benchmarks"


def test_importing_dfineseg_and_infer_stays_light():
    code = ("import sys, dfineseg, dfineseg.api, dfineseg.infer, dfineseg.cli; "
            "print(sorted(m for m in ('torch','pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_api_is_the_functions_of_dfineseg_api():
    import dfineseg
    import dfineseg.export
    import dfineseg.train
    import dfineseg.val
    from dfineseg import api

    assert all(callable(getattr(api, name)) for name in ("train", "val", "export", "bench"))
    assert callable(dfineseg.Predictor) and callable(dfineseg.bench)
    # The layout's subpackages are plain modules: one way to call each command, no module made callable.
    assert not any(callable(module) for module in (dfineseg.train, dfineseg.val, dfineseg.export))


def test_regular_wheel_maps_folders_under_dfineseg(tmp_path):
    """A non-editable build must put export/, infer/, benchmarks/ under dfineseg/, not at top level."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO_ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("dfineseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("dfineseg/infer/boxes.py", "dfineseg/export/__init__.py", "dfineseg/benchmarks/__init__.py", "dfineseg/cli.py"):
        assert module in names, module
    top_levels = {n.split("/")[0] for n in names if not n.startswith("dfineseg-")}
    assert top_levels == {"dfineseg"}, top_levels


def test_cli_help_for_every_subcommand():
    for sub in ("train", "val", "export", "infer", "bench", "data"):
        out = _run(sub, "--help")
        assert out.returncode == 0, out.stderr
        assert "example:" in out.stdout


def test_cli_config_error_is_one_clear_message():
    out = _run("train", "trian.epochs=3")
    assert out.returncode == 2
    assert "did you mean 'train'" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_bad_override_shape():
    out = _run("val", "weights")
    assert out.returncode == 2 and "key=value" in out.stderr and "Traceback" not in out.stderr

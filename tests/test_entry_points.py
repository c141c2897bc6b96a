"""`python -m edgedistill`, `python -m edgedistill.cli` and the `edgedistill` script work from any working
directory, also one holding a folder named `edgedistill` that is not the package (docs/install.md#a-folder-named-edgedistill-in-the-working-directory)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def empty_folder(parent: Path) -> None:
    (parent / "edgedistill").mkdir()


def clone_like_folder(parent: Path) -> None:
    """The parent of a clone: `edgedistill/` holds the project's files and the package one level down, no __init__.py."""
    clone = parent / "edgedistill"
    (clone / "edgedistill" / "runtime").mkdir(parents=True)
    (clone / "pyproject.toml").write_text("[project]\nname = \"edgedistill\"\n")
    (clone / "README.md").write_text("# edgedistill\n")
    (clone / "tests").mkdir()
    (clone / "tests" / "test_x.py").write_text("")
    (clone / "edgedistill" / "runtime" / "notes.txt").write_text("not a module\n")


def script() -> str:
    path = Path(sys.executable).parent / "edgedistill"
    found = str(path) if path.is_file() else shutil.which("edgedistill")
    assert found, "the edgedistill console script is not installed next to this Python"
    return found


COMMANDS = {
    "python -m edgedistill": lambda: [sys.executable, "-m", "edgedistill", "--help"],
    "python -m edgedistill.cli": lambda: [sys.executable, "-m", "edgedistill.cli", "--help"],
    "edgedistill": lambda: [script(), "--help"],
}


@pytest.mark.parametrize("layout", [empty_folder, clone_like_folder], ids=["empty", "clone-like"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_entry_points_work_beside_a_folder_named_edgedistill(tmp_path, layout, command):
    layout(tmp_path)
    # The checkout must reach the child only through the installation, not through an inherited PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME")}
    proc = subprocess.run(COMMANDS[command](), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command} --help in {tmp_path} failed:\n{proc.stderr[-2000:]}"
    assert "Usage" in proc.stdout and "distill" in proc.stdout


def test_the_folder_really_shadows_when_first_on_the_path(tmp_path):
    """The set-up reproduces the trap: with the working directory first on sys.path, `edgedistill` there is a
    namespace package unless the real package is found later on the path (the test above checks it is)."""
    empty_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME")}
    probe = ("import sys, importlib.util; sys.path[:] = [sys.path[0]]; spec = importlib.util.find_spec('edgedistill');"
             "print(spec.origin)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"  # a namespace package: no __init__.py, nothing to run

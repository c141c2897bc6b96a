"""The package's import graph: no module depends on the package root, so `edgedistill/__init__` (the facade of
edgedistill.runtime.loader: `edgedistill.load`) can import the loader without a cycle through every module."""

import ast
from pathlib import Path

import edgedistill

PACKAGE = Path(edgedistill.__file__).parent


def _imports_of_the_root(source: str, label: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "edgedistill":
            found += [f"{label}:{node.lineno} imports {a.name} from the package root"
                      for a in node.names if a.name != "__version__"]
        if isinstance(node, ast.ImportFrom) and node.level and node.module is None:
            found.append(f"{label}:{node.lineno} imports from its package (relative)")
    return found


def test_no_module_imports_a_sibling_through_the_package_root():
    bad = [line for f in sorted(PACKAGE.rglob("*.py")) if f != PACKAGE / "__init__.py"
           for line in _imports_of_the_root(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not bad, "write `import edgedistill.X as X`:\n" + "\n".join(bad)


def test_the_scan_sees_the_root_imports_it_must_refuse():
    source = "import edgedistill.core.atomic as atomic\nfrom edgedistill import __version__, gates\nfrom . import x\n"
    assert _imports_of_the_root(source, "m.py") == ["m.py:2 imports gates from the package root",
                                                    "m.py:3 imports from its package (relative)"]


def test_every_runtime_module_imports_with_the_training_stack_blocked():
    """The device layer as a device without torch imports it (import-linter checks the imports statically)."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys\n"
            "for name in ('torch', 'torchvision', 'open_clip', 'timm'):\n"
            "    sys.modules[name] = None\n"
            "import edgedistill.runtime as runtime\n"
            "names = [m.name for m in pkgutil.walk_packages(runtime.__path__, 'edgedistill.runtime.')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "print(len(names))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 15  # loader, choose, probe, backends, formats, ... all of them

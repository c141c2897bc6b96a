"""The package's import graph: no module depends on the package root, so `edgedistill/__init__` (the facade of
edgedistill.api: `edgedistill.load`) can import the loader without a cycle through every module."""

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
    source = "import edgedistill.atomic as atomic\nfrom edgedistill import __version__, gates\nfrom . import x\n"
    assert _imports_of_the_root(source, "m.py") == ["m.py:2 imports gates from the package root",
                                                    "m.py:3 imports from its package (relative)"]

"""Rules of the test suite itself, read from its source: root-free."""
import ast
import glob
import os

TESTS_DIR = os.path.dirname(os.path.realpath(__file__))
TEST_MODULES = sorted(glob.glob(os.path.join(TESTS_DIR, "test_*.py")))


def parsed(path):
    with open(path) as source:
        return ast.parse(source.read(), path)


def test_no_test_module_imports_another():
    """Shared pieces live in helpers.py (and fixtures in conftest.py), not in a test module."""
    offenders = []
    for path in TEST_MODULES:
        for node in ast.walk(parsed(path)):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{os.path.basename(path)}:{node.lineno} imports {name}"
                          for name in names if name.split(".")[0].startswith(("test_", "conftest"))]
    assert TEST_MODULES and offenders == []


def test_no_fixed_sleeps_in_test_modules():
    """A test waits for a condition with a bound (helpers.wait_for, holds_for), never a time."""
    sleeps = [f"{os.path.basename(path)}:{node.lineno}"
              for path in TEST_MODULES for node in ast.walk(parsed(path))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "sleep"]
    assert sleeps == []

"""The package's layers: import rules checked by import-linter (contracts in pyproject.toml).

Layers, lowest first: errors, kernel, discovery, semaphores, engine,
present, cli.  A module may import its own layer and the layers below it,
never one above, and the modules of one layer form no cycle.
"""
import os
import shutil
import subprocess
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
    linter = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or \
        shutil.which("lint-imports")
    assert linter, "import-linter is not installed (it is in the test extras: pip install -e '.[test]')"
    result = subprocess.run([linter, "--no-cache"], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout

"""The package's identity: one version, shown by `sdtrace --version`, and its metadata."""
import re
import subprocess
from importlib import metadata

import sdtrace
from helpers import sdtrace_command


def test_version_is_one_dotted_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+", sdtrace.__version__)


def test_command_line_prints_the_version():
    result = subprocess.run(sdtrace_command("--version"), capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"sdtrace {sdtrace.__version__}\n", "")


def test_installed_metadata_agrees_with_the_package():
    """pyproject.toml reads the version from sdtrace.__version__ (reinstall if this fails)."""
    assert metadata.version("sdtrace") == sdtrace.__version__
    info = metadata.metadata("sdtrace")
    classifiers = info.get_all("Classifier")
    versions = sorted(int(c.rsplit(".", 1)[1]) for c in classifiers
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions == list(range(9, 14)) and info["Requires-Python"] == ">=3.9"
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert any(url.startswith("Source, https://github.com/") for url in info.get_all("Project-URL"))

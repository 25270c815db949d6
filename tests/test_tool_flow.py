"""`sdtrace flow` against Debian's python3.11 and OpenJDK 17: every call and return
of the program, nested per thread, and the timeline of its calls."""
import json
import os

import pytest

from helpers import LIBJVM, PYTHON_CALLS, SYSTEM_PYTHON, sdtrace

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

CALLS = 500


def _events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="Debian's python3.11 is missing")
def test_python_calls_nest_per_thread(tmp_path):
    timeline = tmp_path / "flow.json"
    result = sdtrace("flow", "--json", "--string-size", "256", "--filter", "*calls.py.[fg]",
                     "--perfetto", str(timeline), "-c", f"{SYSTEM_PYTHON} {PYTHON_CALLS} {CALLS}")
    assert result.returncode == 0, result.stderr
    events = _events(result.stdout)
    calls = [(event["event"], event["call"].rpartition(".")[2], event["depth"])
             for event in events]
    depth = calls[0][2]
    assert calls == [("entry", "g", depth), ("entry", "f", depth + 1),
                     ("return", "f", depth + 1), ("return", "g", depth)] * CALLS
    slices = [event for event in json.loads(timeline.read_text())["traceEvents"]
              if event["ph"] == "X"]
    assert sorted(event["name"].rpartition(".")[2] for event in slices) == \
        ["f"] * CALLS + ["g"] * CALLS


@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17 is not installed")
@pytest.mark.parametrize("executor", ["bpf"], indirect=True)
def test_java_calls_nest(java_classes):
    result = sdtrace("flow", "--json", "--filter", "Calls.[fg]", "--jvm-probes",
                     "-c", f"java -cp {java_classes} Calls {CALLS}")
    assert result.returncode == 0, result.stderr
    calls = [(event["event"], event["call"]) for event in _events(result.stdout)]
    assert calls == [("entry", "Calls.g"), ("entry", "Calls.f"), ("return", "Calls.f"),
                     ("return", "Calls.g")] * CALLS

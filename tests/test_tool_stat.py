"""`sdtrace stat` against Debian's python3.11 and OpenJDK 17: per process, the
calls, collections, allocations, class loads and thread starts, every interval
and in total."""
import json
import os

import pytest

from helpers import LIBJVM, PYTHON_CALLS, SYSTEM_PYTHON, sdtrace

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

CALLS, GCS = 200_000, 5
JVM_OPTIONS = "-XX:+UseSerialGC -Xms256m -Xmx256m"    # collects only when told to


def _lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="Debian's python3.11 is missing")
def test_python_calls_per_process_and_interval():
    result = sdtrace("stat", "--json", "--interval", "0.1",
                     "-c", f"{SYSTEM_PYTHON} {PYTHON_CALLS} {CALLS}")
    assert result.returncode == 0, result.stderr
    lines = _lines(result.stdout)
    [total] = [line for line in lines if line.get("total")]
    assert total["runtime"] == "python" and total["comm"] == "python3.11"
    assert total["calls"] >= 2 * CALLS                 # f and g, and the interpreter's own
    assert set(total) == {"total", "pid", "comm", "runtime", "calls", "gc", "cload"}
    intervals = [line for line in lines if "interval" in line]
    assert intervals and all(line["pid"] == total["pid"] for line in intervals)
    assert sum(line.get("calls", 0) for line in intervals) <= total["calls"]


@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17 is not installed")
@pytest.mark.parametrize("flags", [False, True])
def test_java_collections_are_counted_exactly(java_classes, flags):
    result = sdtrace("stat", "--json", *(["--jvm-probes"] if flags else []),
                     "-c", f"java {JVM_OPTIONS} -cp {java_classes} Gc {GCS}")
    assert result.returncode == 0, result.stderr
    [total] = [line for line in _lines(result.stdout) if line.get("total")]
    assert total["runtime"] == "java" and total["gc"] == GCS
    assert total["threads"] > 0 and total["cload"] > 0
    missing = [line for line in result.stderr.splitlines() if "column:" in line]
    if flags:
        assert missing == [] and total["calls"] > 0 and total["objnew"] > 0
    else:
        assert [line.split(":")[2].strip() for line in missing] == ["no calls column",
                                                                     "no objnew column"]
        assert "runs without -XX:+DTraceMethodProbes" in missing[0]
        assert "calls" not in total and "objnew" not in total

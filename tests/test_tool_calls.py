"""`sdtrace calls` against Debian's python3.11 and OpenJDK 17: the calls a program
makes, counted exactly, and timed with --latency."""
import json
import os

import pytest

from helpers import LIBJVM, PYTHON_CALLS, SYSTEM_PYTHON, one_line_error, sdtrace, summary_counts

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

CALLS = 30_000


def _rows(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="Debian's python3.11 is missing")
@pytest.mark.parametrize("latency", [False, True])
def test_python_calls_are_counted_exactly(latency):
    result = sdtrace("calls", "--json", "--string-size", "256", *(["--latency"] if latency else []),
                     "-c", f"{SYSTEM_PYTHON} {PYTHON_CALLS} {CALLS} 2")
    assert result.returncode == 0, result.stderr
    rows = {(row["file"], row["function"]): row for row in _rows(result.stdout)}
    for function in ("f", "g"):
        row = rows[(PYTHON_CALLS, function)]
        assert row["count"] == 2 * CALLS
        if latency:
            assert row["total_ns"] > 0 and row["mean_ns"] == row["total_ns"] // row["count"]
        else:
            assert "total_ns" not in row
    assert rows[(PYTHON_CALLS, "g")].get("total_ns", 1) > rows[(PYTHON_CALLS, "f")].get(
        "total_ns", 0)                                    # g's time holds f's
    assert summary_counts(result.stderr)[1] == 0


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="Debian's python3.11 is missing")
def test_by_thread_splits_the_counts():
    result = sdtrace("calls", "--json", "--by", "thread", "--latency", "--string-size", "256",
                     "-c", f"{SYSTEM_PYTHON} {PYTHON_CALLS} {CALLS} 2")
    assert result.returncode == 0, result.stderr
    f_rows = [row for row in _rows(result.stdout) if row["function"] == "f"]
    assert sorted(row["count"] for row in f_rows) == [CALLS, CALLS]
    assert len({row["tid"] for row in f_rows}) == 2


@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17 is not installed")
def test_java_calls_are_counted_exactly(java_classes, executor):
    result = sdtrace("calls", "--json", "--latency", "--jvm-probes",
                     "-c", f"java -cp {java_classes} Calls {CALLS}")
    if executor == "tracefs":
        one_line_error(result, "needs the bpf executor")
        return
    assert result.returncode == 0, result.stderr
    rows = {(row["class"], row["method"]): row for row in _rows(result.stdout)}
    assert rows[("Calls", "f")]["count"] == rows[("Calls", "g")]["count"] == CALLS
    assert rows[("Calls", "main")]["count"] == 1


@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17 is not installed")
def test_java_without_the_flag_is_one_line_naming_it(java_classes):
    result = sdtrace("calls", "-c", f"java -cp {java_classes} Calls 10")
    one_line_error(result, "-XX:+DTraceMethodProbes", "--jvm-probes")


def test_a_command_that_could_run_either_runtime_is_one_line(java_classes):
    result = sdtrace("calls", "-c", f"sh -c 'java -cp {java_classes} Calls 10'")
    one_line_error(result, "one runtime at a time", "Python", "Java", "TARGET")

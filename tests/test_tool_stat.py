"""`sdtrace stat` against Debian's python3.11 and OpenJDK 17: per process, the
calls, collections, allocations, class loads and thread starts, every interval
and in total.

The exact numbers are what a program does once sdtrace is armed: a Python
script with its collector disabled, waiting for a line, then collecting
COLLECTIONS times, calling f CALLS times and importing two modules of its
own; Gc calling System.gc() GCS times and Threads starting THREADS threads in a
JVM that collects only when told to (SerialGC, a 256 MiB heap) and starts no
compiler threads later (-XX:-UseDynamicNumberOfCompilerThreads).  Calls are
counted from below only where CPython's frozen importlib runs Python frames of
its own (an import).
"""
import json
import os
import subprocess

import pytest

from helpers import (LIBJVM, PYTHON_CALLS, SYSTEM_PYTHON, Background, jdk_home, sdtrace,
                     summary_counts)

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

CALLS, COLLECTIONS, GCS, THREADS = 20_000, 7, 5, 4
IMPORTLIB_CALLS = 1_000       # at most, the Python frames of importlib in two imports
JVM_OPTIONS = ("-XX:+UseSerialGC", "-Xms256m", "-Xmx256m",
               "-XX:-UseDynamicNumberOfCompilerThreads")
COLUMNS = ("calls", "gc", "objnew", "cload", "threads")
SCRIPT = f"""\
import gc, sys
gc.disable()
def f(x):
    return x + 1
print("ready", flush=True)
sys.stdin.readline()
for _ in range({COLLECTIONS}):
    gc.collect()
for i in range({CALLS}):
    f(i)
import stat_module_a, stat_module_b
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def python_script(tmp_path):
    """The argv of SCRIPT under Debian's python3.11, its two modules beside it."""
    for name in ("stat_module_a", "stat_module_b"):
        (tmp_path / f"{name}.py").write_text(f"NAME = {name!r}\n")
    (tmp_path / "collect.py").write_text(SCRIPT)
    return [SYSTEM_PYTHON, str(tmp_path / "collect.py")]


def _java(classes, program, count, *options):
    return [os.path.join(jdk_home(), "bin", "java"), *JVM_OPTIONS, *options, "-cp", classes,
            program, str(count), "wait"]


def _stat_while(programs, stat_arguments):
    """(the CompletedProcess of `stat --json`, [pids]): `programs` (argvs that print
    "ready", wait for a line, work, print "done" and wait for another) started; stat
    armed with stat_arguments(pids); the programs' work; stat stopped by SIGINT."""
    targets = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=os.path.dirname(argv[-1])
                                if argv[-1].endswith(".py") else None)
               for argv in programs]
    tracer = None
    try:
        for target in targets:
            assert target.stdout.readline().strip() == "ready"
        pids = [target.pid for target in targets]
        tracer = Background("stat", "--json", "--interval", "0.2", *stat_arguments(pids))
        for target in targets:
            target.stdin.write("go\n")
            target.stdin.flush()
        for target in targets:
            assert target.stdout.readline().strip() == "done"
        result = tracer.stop()
    finally:
        if tracer is not None:
            tracer.kill()
        for target in targets:
            target.communicate("end\n", timeout=60)
    assert result.returncode in (0, 130), result.stderr
    return result, pids


def _lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _total(result, pid):
    [total] = [line for line in _lines(result.stdout) if line.get("total") and line["pid"] == pid]
    return total


def _not_counted(result):
    return [line for line in result.stderr.splitlines() if "not counted (shown as 'flag')" in line]


def test_a_python_process_is_counted_exactly(python_script):
    result, [pid] = _stat_while([python_script], lambda pids: ["-p", str(pids[0])])
    total = _total(result, pid)
    assert (total["runtime"], total["comm"]) == ("python", "python3.11")
    assert (total["gc"], total["cload"]) == (COLLECTIONS, 2), total
    assert CALLS <= total["calls"] <= CALLS + IMPORTLIB_CALLS, total
    assert total["objnew"] is None and total["threads"] is None     # no probe in 3.11
    assert list(total) == ["total", "pid", "comm", "runtime", *COLUMNS]
    assert summary_counts(result.stderr) == (sum(total[column] or 0 for column in COLUMNS), 0)
    intervals = [line for line in _lines(result.stdout) if "interval" in line]
    assert all(line["pid"] == pid for line in intervals)
    assert sum(line["gc"] for line in intervals) <= COLLECTIONS


@pytest.mark.parametrize("flags", [False, True])
def test_a_jvm_command_is_counted_exactly_and_what_it_lacks_is_said(java_classes, flags):
    command = " ".join(_java(java_classes, "Gc", GCS)[:-1])
    result = sdtrace("stat", "--json", *(["--jvm-probes"] if flags else []), "-c", command)
    assert result.returncode == 0, result.stderr
    [total] = [line for line in _lines(result.stdout) if line.get("total")]
    assert (total["runtime"], total["gc"]) == ("java", GCS), total
    assert total["threads"] > 0 and total["cload"] > 0
    if flags:
        assert _not_counted(result) == [] and total["calls"] > 0 and total["objnew"] > 0
    else:
        [line] = _not_counted(result)
        assert ("calls: the command's JVM runs without -XX:+DTraceMethodProbes; objnew: the "
                "command's JVM runs without -XX:+DTraceAllocProbes; --jvm-probes gives the "
                "flags") in line
        assert total["calls"] is None and total["objnew"] is None


def test_the_threads_a_running_jvm_starts_are_counted_exactly(java_classes):
    result, [pid] = _stat_while([_java(java_classes, "Threads", THREADS)],
                                lambda pids: ["-p", str(pids[0])])
    total = _total(result, pid)
    assert (total["threads"], total["gc"]) == (THREADS, 0), total
    assert total["calls"] is None and total["objnew"] is None
    [line] = _not_counted(result)
    assert (f"calls: process {pid}'s JVM runs without -XX:+DTraceMethodProbes (read from its "
            "memory)") in line and line.endswith("restart it with the flags")


def test_python_and_java_at_once_system_wide(java_classes, python_script):
    """TARGETs of two runtimes: one session, a row per process, each with its own counts
    (other processes on the machine may show too); the JVM runs with the flag of calls
    and without that of allocations, read from its memory when it first shows."""
    result, [java, python] = _stat_while(
        [_java(java_classes, "Gc", GCS, "-XX:+DTraceMethodProbes"), python_script],
        lambda _pids: [LIBJVM, SYSTEM_PYTHON])
    java_total, python_total = _total(result, java), _total(result, python)
    assert (java_total["runtime"], java_total["gc"]) == ("java", GCS), java_total
    assert java_total["calls"] > 0 and java_total["objnew"] is None
    assert f"objnew: process {java}'s JVM runs without -XX:+DTraceAllocProbes" in \
        "\n".join(_not_counted(result))
    assert (python_total["runtime"], python_total["gc"], python_total["cload"]) == (
        "python", COLLECTIONS, 2), python_total


def test_the_table_shows_rates_every_interval_then_the_totals():
    result = sdtrace("stat", "--interval", "0.1", "-c", f"{SYSTEM_PYTHON} {PYTHON_CALLS} 300000")
    assert result.returncode == 0, result.stderr
    tables = result.stdout.split("\n\n")
    *intervals, total = tables
    assert intervals and all(table.splitlines()[0].endswith(" s") for table in intervals)
    assert intervals[0].splitlines()[1].split() == [
        "PID", "COMM", "RUNTIME", "CALLS/s", "GC/s", "OBJNEW/s", "CLOAD/s", "THREAD/s"]
    heading, header, row = total.strip().splitlines()
    assert (heading, header.split()) == (
        "total", ["PID", "COMM", "RUNTIME", "CALLS", "GC", "OBJNEW", "CLOAD", "THREAD"])
    pid, comm, runtime, calls, _gc, objnew, _cload, threads = row.split()
    assert (comm, runtime, objnew, threads) == ("python3.11", "python", "-", "-")
    assert int(calls) >= 2 * 300_000         # f and g, and the interpreter's own
